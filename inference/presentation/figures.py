"""Figures of a run: curves from ``metrics.jsonl`` records, bars from a summary, image grids.

Plotting only: every ``plot_*`` function takes numbers computed elsewhere and returns a
matplotlib Figure; ``save_figure`` writes one as PNG, ``figure_png`` gives its bytes.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..foundations.atomic import write_atomic
from ..foundations.wording import counted
from .table import labels


class ShownFigure(Figure):
    """A Figure that Jupyter shows as PNG: elbogap's figures are made without pyplot (no GUI
    backend, no global figure list to leak), so IPython's pyplot hooks never see them.

    ``show()`` displays it at once in a Jupyter kernel, so that every ``d.plot_…()`` of a cell
    is seen, not only the cell's last value; a figure is shown once per cell, so returning it
    as the cell's value as well does not show it twice."""

    _shown_in_cell: int | None = None

    def _repr_png_(self) -> bytes:
        return figure_png(self)

    def _ipython_display_(self) -> None:
        kernel = _jupyter_kernel()
        cell = kernel.execution_count if kernel is not None else None
        if cell is not None and cell == self._shown_in_cell:
            return
        self._shown_in_cell = cell
        from IPython.display import display

        display({"image/png": figure_png(self), "text/plain": repr(self)}, raw=True)

    def show(self, warn: bool = True) -> None:
        """Display the figure now in a Jupyter kernel; elsewhere (a script, a terminal) do
        nothing: save it with ``savefig``.  (``warn`` is matplotlib's, unused here.)"""
        if _jupyter_kernel() is not None:
            self._ipython_display_()


def _jupyter_kernel():
    """The running IPython shell when it is a Jupyter kernel's, else None (IPython is never
    imported for this: a session without it has no kernel)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell if getattr(shell, "kernel", None) is not None else None


def shown(fig: Figure) -> Figure:
    """``fig``, displayed at once when it runs in a Jupyter kernel (``ShownFigure.show``)."""
    if isinstance(fig, ShownFigure):
        fig.show()
    return fig


def subplots(*grid: int, figsize: tuple[float, float], layout: str | None = None, **kwargs):
    """``plt.subplots`` without pyplot."""
    fig = ShownFigure(figsize=figsize, layout=layout)
    return fig, fig.subplots(*grid, **kwargs)


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def save_figure(fig: Figure, path: str | Path) -> None:
    png = figure_png(fig)
    write_atomic(path, lambda f: f.write(png))


# Between images in a grid: a colour no grey-level pixel has, so white or black pixels at an
# image's edge do not merge with the gutter.
GUTTER_RGB = (0.35, 0.55, 0.85)


def _integer_ticks(axis) -> None:
    """Epochs, dimensions and counts are whole numbers: no 2.5 on their axes."""
    axis.set_major_locator(MaxNLocator(integer=True))


def _diagnosed(history: Sequence[dict]) -> list[dict]:
    return [r for r in history if "diagnostics" in r]


def _entry(summary: dict, key: str) -> dict:
    """Mean and SE of ``key``: over data points, or for a pair whose unit is the data set its
    total per data point (so that both kinds of run plot on one scale)."""
    if key in summary:
        return summary[key]
    total, n = summary["total"], summary["num_data"]
    se = total.get(f"{key}_se")
    return {"mean": total[key] / n, "se": se / n if se is not None else None}


def _points(records: Sequence[dict]) -> str:
    """Which points the diagnostics of a run are about (see elbogap.training.plan.EvaluationPlan)."""
    last = records[-1]["diagnostics"] if records else {}
    if last.get("split", "test") in ("test", "validation"):
        return last.get("split", "test")
    return "training set (total / N):" if last.get("unit") == "data set" else "training"


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    entries = [_entry(r["diagnostics"], key) for r in records]
    mean = np.array([e["mean"] if e["mean"] is not None else np.nan for e in entries], dtype=float)
    se = np.array([e["se"] or 0.0 for e in entries], dtype=float)
    return mean, se


def plot_elbo_curves(history: Sequence[dict], objective: str = "ELBO") -> Figure:
    """The training objective (``objective`` names it) and the held-out ELBO per epoch."""
    epochs = [r["epoch"] for r in history]
    fig, ax = subplots(figsize=(6, 4))
    # Runs written before the objective had its own field hold it as train_elbo.
    trained = [r.get("train_objective", r.get("train_elbo")) for r in history]
    ax.plot(epochs, trained, label="train ELBO" if objective == "ELBO"
            else f"train objective: {objective}")
    for split in ("validation", "test"):
        if any(r.get(f"{split}_elbo") is not None for r in history):
            ax.plot(epochs, [r.get(f"{split}_elbo") for r in history], label=f"{split} ELBO")
    ax.set_xlabel("epoch")
    _integer_ticks(ax.xaxis)
    ax.set_ylabel("ELBO per data point (nats)")
    ax.set_title("ELBO during training")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def _named(records: Sequence[dict]) -> dict[str, str]:
    """The quantities' names for the pair of these records (``table.labels``): log p(y | inputs)
    for a conditional model, the data set's totals for global latents."""
    return labels(records[-1]["diagnostics"] if records else {})


def unreliable_share(diagnostics: dict) -> float:
    """The share of points whose k-hat says their log p(x) cannot be believed (k-hat > 0.7,
    not counting k-hat unstable on nearly equal weights); 1 or 0 for a data set's one k-hat."""
    khat = diagnostics.get("khat") or {}
    return float(khat.get("share_unreliable", 0.0)) - float(khat.get("share_unstable", 0.0))


# Above this share of points with k-hat > 0.7, an epoch's mean log p(x) is drawn as not
# reliable: dashed, no band (its standard error cannot be believed either).
UNRELIABLE_MAJORITY = 0.5


def plot_terms_curves(history: Sequence[dict]) -> Figure:
    records = _diagnosed(history)
    epochs = [r["epoch"] for r in records]
    named = _named(records)
    fig, (left, right) = subplots(1, 2, figsize=(10, 4))
    for ax, key, title in (
        (left, "reconstruction", f"reconstruction  {named['reconstruction']}"),
        (right, "kl_prior", named["kl"]),
    ):
        mean, se = _series(records, key)
        ax.plot(epochs, mean, label="estimate")
        if np.any(se > 0):
            # A data set's totals carry no SE over points: no band, and none in the legend.
            ax.fill_between(epochs, mean - 2 * se, mean + 2 * se, alpha=0.25, label="± 2 SE")
        ax.set_xlabel("epoch")
        _integer_ticks(ax.xaxis)
        ax.set_ylabel("nats per data point")
        ax.set_title(f"{_points(records)} {title}")
        ax.legend()
        ax.grid(alpha=0.3)
    return fig


def _drawn_with_reliability(ax, epochs, mean, se, unreliable, color, label) -> None:
    """A curve solid with its ± 2 SE band where it can be believed; dashed, marked and
    without a band at the epochs where it cannot (``unreliable``)."""
    epochs, unreliable = np.asarray(epochs), np.asarray(unreliable, dtype=bool)
    fine = np.where(unreliable, np.nan, mean)
    ax.plot(epochs, fine, color=color, label=label if not unreliable.all() else None)
    ax.fill_between(epochs, fine - 2 * se, fine + 2 * se, color=color, alpha=0.2)
    if unreliable.any():
        # Joined to its reliable neighbours, so that the curve stays one line.
        near = unreliable | np.r_[unreliable[1:], False] | np.r_[False, unreliable[:-1]]
        ax.plot(epochs, np.where(near, mean, np.nan), color=color, ls="--", marker="x",
                label=f"{label}: NOT reliable (k-hat > 0.7)")


def plot_evidence_gap(history: Sequence[dict]) -> Figure:
    records = _diagnosed(history)
    epochs = [r["epoch"] for r in records]
    k = records[-1]["diagnostics"]["num_samples"] if records else "?"
    fig, (top, bottom) = subplots(2, 1, figsize=(6, 6), sharex=True)
    exact = [r.get("exact") for r in records]
    has_exact = bool(records) and all(e is not None for e in exact)
    named = _named(records)
    evidence = named["evidence"]
    shares = np.array([unreliable_share(r["diagnostics"]) for r in records])
    unreliable = shares > UNRELIABLE_MAJORITY
    for color, key, label in (("C0", "log_evidence", f"{evidence}, importance sampling K={k}"),
                              ("C1", "elbo", "ELBO")):
        mean, se = _series(records, key)
        _drawn_with_reliability(top, epochs, mean, se,
                                unreliable if key == "log_evidence" else np.zeros_like(unreliable),
                                color, label)
        if has_exact:
            top.plot(epochs, [e[key] for e in exact], "k--", lw=1,
                     label="closed form" if key == "elbo" else None)
    top.set_ylabel("nats per data point")
    top.set_title(f"{_points(records)} evidence and ELBO (bands: ± 2 SE)")
    top.legend()
    top.grid(alpha=0.3)
    # The band is the Monte Carlo error of the gap, averaged over points: the spread of the
    # dataset mean over data points would hide how well the estimator tracks the truth.
    mean, total_se = _series(records, "evidence_gap")
    se = np.array([r["diagnostics"].get("evidence_gap_mc_se", s) or 0.0
                   for r, s in zip(records, total_se, strict=True)])
    _drawn_with_reliability(bottom, epochs, mean, se, unreliable, "C3",
                            "estimated (± 2 Monte Carlo SE)")
    if has_exact:
        bottom.plot(epochs, [e["evidence_gap"] for e in exact], "k--", lw=1,
                    label="closed form KL(q || p(z|x))")
    if records and shares[-1] > 0:
        # The table's caveat, on the figure: the last epoch's k-hat verdict.
        # Below the axes, where no curve runs under it (saved with bbox_inches="tight").
        bottom.text(0.0, -0.22, "last epoch: " + _wrapped(
            records[-1]["diagnostics"]["khat"]["verdict"].split(";")[0]),
                    transform=bottom.transAxes, fontsize=7.5, color="C3", va="top")
    bottom.legend()
    bottom.set_xlabel("epoch")
    _integer_ticks(bottom.xaxis)
    bottom.set_ylabel("nats per data point")
    kl = ("KL(q || p(latents | data))" if records and
          records[-1]["diagnostics"].get("unit") == "data set" else "KL(q(z|x) || p(z|x))")
    bottom.set_title(f"evidence gap  {evidence} - ELBO  ≈ {kl}")
    bottom.grid(alpha=0.3)
    return fig


def _wrapped(text: str, width: int = 90) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def plot_kl_per_dim(kl_per_dim: dict[str, Sequence[float]], data_set: bool = False) -> Figure:
    """KL to the prior per dimension of each latent site: the mean over data points, or with
    ``data_set`` (global latents) the data set's one KL."""
    sites = list(kl_per_dim)
    fig, axes = subplots(len(sites), 1, figsize=(7, 2.6 * len(sites)), squeeze=False,
                             layout="constrained")
    for ax, site in zip(axes[:, 0], sites, strict=False):
        values = np.asarray(kl_per_dim[site], dtype=float)
        ax.bar(np.arange(len(values)), values)
        _integer_ticks(ax.xaxis)
        ax.set_xlabel(f"dimension of latent site '{site}'")
        ax.set_ylabel("KL (nats)")
        ax.set_title(f"KL(q || p) per dimension of the data set's latent site '{site}'"
                     if data_set else f"mean KL(q(z|x) || p(z)) per dimension, site '{site}'")
        ax.grid(alpha=0.3, axis="y")
    return fig


def _tile(images: np.ndarray, image_shape: tuple[int, int], columns: int) -> np.ndarray:
    """The images in a grid, as RGB: grey levels, separated by ``GUTTER_RGB`` lines."""
    h, w = image_shape
    rows = -(-len(images) // columns)
    canvas = np.empty((rows * (h + 1) - 1, columns * (w + 1) - 1, 3))
    canvas[:] = GUTTER_RGB
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grey = np.clip(image.reshape(h, w), 0, 1)[..., None]
        canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = grey
    return canvas


def plot_reconstructions(
    inputs: np.ndarray, reconstructions: np.ndarray, image_shape: tuple[int, int]
) -> Figure:
    """Inputs on odd rows, their reconstructions (mean of p(x|z), z ~ q(z|x)) beneath."""
    columns = 8
    rows = []
    for s in range(0, len(inputs), columns):
        rows += [inputs[s : s + columns], reconstructions[s : s + columns]]
    pairs = np.concatenate(rows)
    fig, ax = subplots(figsize=(6, 0.75 * len(pairs) / columns + 0.5))
    ax.imshow(_tile(pairs, image_shape, columns))
    ax.set_title("inputs (odd rows) and reconstructions E[x|z], z ~ q(z|x) (even rows)")
    ax.axis("off")
    return fig


def plot_image_grid(
    images: np.ndarray, image_shape: tuple[int, int], title: str
) -> Figure:
    fig, ax = subplots(figsize=(6, 6))
    ax.imshow(_tile(images, image_shape, 8))
    ax.set_title(title)
    ax.axis("off")
    return fig


def plot_khat_histogram(khat: np.ndarray) -> Figure:
    """Pareto k-hat per data point, with the reliability thresholds 0.5 and 0.7."""
    finite = khat[np.isfinite(khat)]
    fig, ax = subplots(figsize=(6, 3.6))
    ax.hist(finite, bins=40, color="C0")
    _integer_ticks(ax.yaxis)
    ax.axvline(0.5, color="C2", ls="--", lw=1.2, label="0.5: good below")
    ax.axvline(0.7, color="C3", ls="--", lw=1.2, label="0.7: unreliable above")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    perfect = int((~np.isfinite(khat)).sum())
    note = f" ({counted(perfect, 'point')} with constant weights not shown)" if perfect else ""
    ax.set_xlabel("Pareto k-hat of the importance weights (dimensionless)")
    ax.set_ylabel("data points")
    ax.set_title(f"reliability of log p(x) per data point{note}")
    ax.grid(alpha=0.3)
    return fig


def plot_active_units(variances: dict[str, Sequence[float]], threshold: float) -> Figure:
    """Cov_x(E_q[z_d | x]) per latent dimension, log scale, with the activity threshold."""
    sites = list(variances)
    fig, axes = subplots(len(sites), 1, figsize=(7, 2.8 * len(sites)), squeeze=False,
                             layout="constrained")
    for ax, site in zip(axes[:, 0], sites, strict=False):
        values = np.maximum(np.asarray(variances[site], dtype=float), 1e-12)
        _integer_ticks(ax.xaxis)
        colors = ["C0" if v > threshold else "C7" for v in values]
        ax.bar(np.arange(len(values)), values, color=colors)
        ax.axhline(threshold, color="C3", ls="--", lw=1, label=f"threshold {threshold}")
        ax.set_yscale("log")
        ax.set_xlabel(f"dimension of latent site '{site}'")
        ax.set_ylabel("Cov_x(E_q[z_d|x])  (latent units²)")
        active = int((values > threshold).sum())
        ax.set_title(f"active units, site '{site}': {active} of {len(values)} (grey: inactive)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(alpha=0.3, axis="y")
    return fig


def plot_gap_decomposition(approximation: np.ndarray, amortization: np.ndarray) -> Figure:
    """Mean approximation and amortization gaps (± 2 SE over points), and their spread."""
    fig, (left, right) = subplots(1, 2, figsize=(10, 3.8))
    means = [approximation.mean(), amortization.mean()]
    ses = [approximation.std(ddof=1) / np.sqrt(len(approximation)),
           amortization.std(ddof=1) / np.sqrt(len(amortization))]
    labels = ["approximation gap\nlog p(x) - ELBO[q*]", "amortization gap\nELBO[q*] - ELBO[encoder]"]
    left.bar(labels, means, yerr=[2 * s for s in ses], color=["C1", "C2"], capsize=6)
    left.set_ylabel("nats per data point")
    left.set_title(f"where the evidence gap comes from (n={len(approximation)})")
    left.grid(alpha=0.3, axis="y")
    bins = np.histogram_bin_edges(np.concatenate([approximation, amortization]), bins=30)
    right.hist(approximation, bins=bins, histtype="step", lw=2, color="C1", label="approximation")
    right.hist(amortization, bins=bins, histtype="step", lw=2, color="C2", label="amortization")
    _integer_ticks(right.yaxis)
    right.set_xlabel("gap per data point (nats)")
    right.set_ylabel("data points")
    right.set_title("spread over data points")
    right.legend()
    right.grid(alpha=0.3)
    return fig


def plot_runs_overlaid(names: Sequence[str], histories: Sequence[Sequence[dict]]) -> Figure:
    """Held-out ELBO (left) and evidence gap (right) over epochs, one line per run."""
    fig, (left, right) = subplots(1, 2, figsize=(11, 4), layout="constrained")
    for name, history in zip(names, histories, strict=True):
        held = [r for r in history if r.get("test_elbo", r.get("validation_elbo")) is not None]
        left.plot([r["epoch"] for r in held],
                  [r.get("test_elbo", r.get("validation_elbo")) for r in held], label=name)
        diag = [r for r in history if "diagnostics" in r
                and r["diagnostics"].get("evidence_gap") is not None]
        right.plot([r["epoch"] for r in diag],
                   [r["diagnostics"]["evidence_gap"]["mean"] for r in diag], marker="o", ms=3,
                   label=name)
    for ax, label in ((left, "held-out ELBO per point (nats)"),
                      (right, "evidence gap per point (nats)")):
        ax.set_xlabel("epoch")
        _integer_ticks(ax.xaxis)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    left.set_title("ELBO during training")
    right.set_title("evidence gap during training")
    return fig


def plot_ais_vs_importance(importance: np.ndarray, ais: np.ndarray, khat: np.ndarray) -> Figure:
    """Per point, AIS minus importance sampling against importance sampling's log p(x),
    coloured by its Pareto k-hat: where k-hat > 0.7 importance sampling falls short of AIS."""
    fig, ax = subplots(figsize=(6.5, 4.2), layout="constrained")
    finite = np.where(np.isfinite(khat), khat, np.nan)
    points = ax.scatter(importance, ais - importance, c=finite, cmap="viridis", vmin=0,
                        vmax=max(1.0, np.nanmax(finite) if np.isfinite(finite).any() else 1.0),
                        s=18)
    fig.colorbar(points, ax=ax, label="Pareto k-hat of importance sampling")
    ax.axhline(0, color="0.4", lw=1)
    ax.set_xlabel("log p(x), importance sampling (nats)")
    ax.set_ylabel("AIS - importance sampling (nats)")
    ax.set_title(f"AIS beside importance sampling (n={len(ais)})")
    ax.grid(alpha=0.3)
    return fig


def plot_latent_scatter(
    means: np.ndarray, color: np.ndarray, color_label: str, axis_labels: tuple[str, str]
) -> Figure:
    """Points in a 2-D latent space (or a projection of it), coloured by a per-point value; for
    a 1-D latent space (one column of ``means``) that value against E_q[z] instead, rather
    than a second axis that means nothing."""
    fig, ax = subplots(figsize=(6, 5))
    ax.set_xlabel(axis_labels[0])
    if means.shape[1] == 1:
        ax.scatter(means[:, 0], color, s=10)
        ax.set_ylabel(color_label)
    else:
        points = ax.scatter(means[:, 0], means[:, 1], c=color, s=10, cmap="viridis")
        fig.colorbar(points, ax=ax, label=color_label)
        ax.set_ylabel(axis_labels[1])
    ax.set_title("E_q[z | x] of test points")
    ax.grid(alpha=0.3)
    return fig


DIVERGENCE = {"reverse": "min D(p_θ || q)", "forward": "min D(q || p_θ)"}


def plot_kl_directions(target, fits: dict, title: str) -> Figure:
    """The target density and the Gaussians fitted by each direction of the KL."""
    x = torch.linspace(-6, 6, 1201).unsqueeze(-1)
    fig, ax = subplots(figsize=(7, 4))
    with torch.no_grad():
        ax.fill_between(x[:, 0], target.log_prob(x).exp(), color="0.85", label="target q")
        for (name, fit), color in zip(fits.items(), ("C3", "C0"), strict=True):
            density = fit["family"].distribution().log_prob(x).exp()
            ax.plot(x[:, 0], density, color=color, lw=2,
                    label=f"{name} KL, {DIVERGENCE[name]}: loc {fit['loc']:.2f}, "
                          f"scale {fit['scale']:.2f}")
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _panel_grid(count: int, columns: int = 4):
    rows = (count + columns - 1) // columns
    fig, axes = subplots(rows, min(count, columns), figsize=(3.2 * min(count, columns), 2.6 * rows),
                         layout="constrained", squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def plot_rank_histograms(panels: Sequence[tuple[str, np.ndarray]], num_draws: int,
                         bins: int) -> Figure:
    """Simulation-based calibration: per coordinate (``(title, ranks)``), the histogram of the
    true value's rank among ``num_draws`` guide draws, with the uniform count and its central
    99 % binomial range (pointwise)."""
    fig, axes = _panel_grid(len(panels))
    for ax, (title, ranks) in zip(axes, panels, strict=True):
        m = len(ranks)
        ax.hist(ranks, bins=np.linspace(-0.5, num_draws + 0.5, bins + 1), color="C0")
        expected = m / bins
        spread = 2.576 * np.sqrt(expected * (1 - 1 / bins))
        ax.axhspan(expected - spread, expected + spread, color="0.8", zorder=0,
                   label="uniform ± 99 % (pointwise)")
        ax.axhline(expected, color="0.4", lw=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"rank among {num_draws} draws")
        ax.set_ylabel("simulations")
    axes[0].legend(fontsize=7, loc="lower center")
    return fig


def plot_ecdf_differences(panels: Sequence[tuple[str, np.ndarray]], z: np.ndarray,
                          lower: np.ndarray, upper: np.ndarray) -> Figure:
    """Simulation-based calibration: per coordinate (``(title, u)``, u the rank scaled to
    (0, 1)), ECDF(u) - u with the simultaneous 95 % band of uniform ranks (Säilynoja et al.
    2022): a curve leaving the band is miscalibrated; a hump above 0 in the middle means ranks
    piled low, the truth below the draws (q shifted high); an S through 0 means ranks at both
    ends (q too narrow), its mirror image q too wide."""
    fig, axes = _panel_grid(len(panels))
    for ax, (title, u) in zip(axes, panels, strict=True):
        ecdf = (u[:, None] < z[None, :]).mean(0)
        ax.fill_between(z, lower, upper, color="0.85", step="mid",
                        label="uniform, 95 % simultaneous")
        ax.plot(z, ecdf - z, color="C0", lw=1.3)
        ax.axhline(0, color="0.4", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("fractional rank u")
        ax.set_ylabel("ECDF(u) − u")
    axes[0].legend(fontsize=7, loc="lower center")
    return fig
