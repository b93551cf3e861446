"""Figures of a run: curves from ``metrics.jsonl`` records, bars from a summary, image grids.

Plotting only: every function takes numbers that were computed elsewhere and writes one PNG.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from inference.atomic import write_atomic  # noqa: E402


def save_figure(fig, path: str | Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, lambda f: f.write(buffer.getvalue()))


def _diagnosed(history: Sequence[dict]) -> list[dict]:
    return [r for r in history if "diagnostics" in r]


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    mean = np.array([r["diagnostics"][key]["mean"] for r in records], dtype=float)
    se = np.array([r["diagnostics"][key]["se"] or 0.0 for r in records], dtype=float)
    return mean, se


def plot_elbo_curves(history: Sequence[dict], path: str | Path) -> None:
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train_elbo"] for r in history], label="train ELBO")
    ax.plot(epochs, [r["test_elbo"] for r in history], label="test ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO per data point (nats)")
    ax.set_title("ELBO during training")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_terms_curves(history: Sequence[dict], path: str | Path) -> None:
    records = _diagnosed(history)
    epochs = [r["epoch"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in (
        (left, "reconstruction", "reconstruction  E_q[log p(x|z)]"),
        (right, "kl_prior", "KL(q(z|x) || p(z))"),
    ):
        mean, se = _series(records, key)
        ax.plot(epochs, mean)
        ax.fill_between(epochs, mean - 2 * se, mean + 2 * se, alpha=0.25, label="± 2 SE")
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per data point")
        ax.set_title(f"test {title}")
        ax.legend()
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_evidence_gap(history: Sequence[dict], path: str | Path) -> None:
    records = _diagnosed(history)
    epochs = [r["epoch"] for r in records]
    k = records[-1]["diagnostics"]["num_samples"] if records else "?"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    exact = [r.get("exact") for r in records]
    has_exact = bool(records) and all(e is not None for e in exact)
    for color, key, label in (("C0", "log_evidence", f"log p(x), importance sampling K={k}"),
                              ("C1", "elbo", "ELBO")):
        mean, se = _series(records, key)
        top.plot(epochs, mean, color=color, label=label)
        top.fill_between(epochs, mean - 2 * se, mean + 2 * se, color=color, alpha=0.2)
        if has_exact:
            top.plot(epochs, [e[key] for e in exact], "k--", lw=1,
                     label="closed form" if key == "elbo" else None)
    top.set_ylabel("nats per data point")
    top.set_title("test evidence and ELBO (bands: ± 2 SE)")
    top.legend()
    top.grid(alpha=0.3)
    # The band is the Monte Carlo error of the gap, averaged over points: the spread of the
    # dataset mean over data points would hide how well the estimator tracks the truth.
    mean = np.array([r["diagnostics"]["evidence_gap"]["mean"] for r in records], dtype=float)
    se = np.array([r["diagnostics"].get("evidence_gap_mc_se") or 0.0 for r in records])
    bottom.plot(epochs, mean, color="C3", label="estimated (± 2 Monte Carlo SE)")
    bottom.fill_between(epochs, mean - 2 * se, mean + 2 * se, color="C3", alpha=0.25)
    if has_exact:
        bottom.plot(epochs, [e["evidence_gap"] for e in exact], "k--", lw=1,
                    label="closed form KL(q || p(z|x))")
    bottom.legend()
    bottom.set_xlabel("epoch")
    bottom.set_ylabel("nats per data point")
    bottom.set_title("evidence gap  log p(x) - ELBO  ≈ KL(q(z|x) || p(z|x))")
    bottom.grid(alpha=0.3)
    save_figure(fig, path)


def plot_kl_per_dim(kl_per_dim: dict[str, Sequence[float]], path: str | Path) -> None:
    sites = list(kl_per_dim)
    fig, axes = plt.subplots(len(sites), 1, figsize=(7, 2.6 * len(sites)), squeeze=False)
    for ax, site in zip(axes[:, 0], sites, strict=False):
        values = np.asarray(kl_per_dim[site], dtype=float)
        ax.bar(np.arange(len(values)), values)
        ax.set_xlabel(f"dimension of latent site '{site}'")
        ax.set_ylabel("KL (nats)")
        ax.set_title(f"mean KL(q || p(z)) per dimension, site '{site}'")
        ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def _tile(images: np.ndarray, image_shape: tuple[int, int], columns: int) -> np.ndarray:
    h, w = image_shape
    rows = -(-len(images) // columns)
    canvas = np.ones((rows * (h + 1) - 1, columns * (w + 1) - 1))
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = image.reshape(h, w)
    return canvas


def plot_reconstructions(
    inputs: np.ndarray, reconstructions: np.ndarray, image_shape: tuple[int, int],
    path: str | Path,
) -> None:
    """Inputs on odd rows, their reconstructions (mean of p(x|z), z ~ q(z|x)) beneath."""
    columns = 8
    rows = []
    for s in range(0, len(inputs), columns):
        rows += [inputs[s : s + columns], reconstructions[s : s + columns]]
    pairs = np.concatenate(rows)
    fig, ax = plt.subplots(figsize=(6, 0.75 * len(pairs) / columns + 0.5))
    ax.imshow(_tile(pairs, image_shape, columns), cmap="gray", vmin=0, vmax=1)
    ax.set_title("test inputs (odd rows) and reconstructions E[x|z], z ~ q(z|x) (even rows)")
    ax.axis("off")
    save_figure(fig, path)


def plot_image_grid(
    images: np.ndarray, image_shape: tuple[int, int], path: str | Path, title: str
) -> None:
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(_tile(images, image_shape, 8), cmap="gray", vmin=0, vmax=1)
    ax.set_title(title)
    ax.axis("off")
    save_figure(fig, path)
