"""Diagnosing a run: the one place that decides what a run's points get.

A guide fitted to its training set (global latents, or parameters per training point) has an
evidence gap only on those points: held-out points get the log posterior predictive density
under it instead, never a gap.  Everything that diagnoses a run asks ``diagnose``: the final
evaluation after training (``final_summary``), ``scripts/evaluate.py`` and the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..data.dataset import subset, subset_indices
from ..data.synthetic import synthetic_truth
from ..diagnostics.evaluation import evaluate
from ..diagnostics.predictive import PosteriorPredictive, posterior_predictive
from ..diagnostics.reconstruction import reconstruct, sample_prior_means
from ..diagnostics.results import DATA_SET, Diagnostics
from ..foundations.atomic import write_json_atomic
from ..foundations.conventions import inspect_pair
from ..foundations.data_plate import program_pair
from ..foundations.device import rows_per_chunk as default_rows_per_chunk
from ..foundations.distributed import SINGLE, Distributed
from ..foundations.errors import ElbogapError, OptionError
from ..foundations.rng import rng_preserved
from ..foundations.wording import counted
from ..presentation.figures import (
    plot_elbo_curves,
    plot_evidence_gap,
    plot_image_grid,
    plot_kl_per_dim,
    plot_reconstructions,
    plot_terms_curves,
    save_figure,
)
from .pairs import exact_comparison, exact_means
from .recorded import DIAGNOSTICS
from .run_directory import Run

SPLITS = ("test", "train", "validation")
ANNOUNCE_AFTER_SECONDS = 30


@dataclass
class Diagnosis:
    """A run's pair on the points ``x`` of ``split``: ``evaluate``'s diagnostics, or for held-out
    points of a guide fitted to the training set its posterior predictive density."""

    run: Run
    split: str
    x: torch.Tensor
    estimate: Diagnostics | PosteriorPredictive

    @property
    def predictive(self) -> bool:
        return isinstance(self.estimate, PosteriorPredictive)

    @property
    def file_name(self) -> str:
        """Where ``scripts/evaluate.py`` saves it in the run directory."""
        kind = "predictive" if self.predictive else "evaluation"
        return f"{kind}-{self.split}-K{self.estimate.num_samples}.json"

    def summary(self) -> dict:
        """The numbers as the run directory's JSON files hold them, with the closed forms of a
        model that has them set beside the estimates."""
        out = {"data": self.run.config["data"], "split": self.split, **self.estimate.summary()}
        if not self.predictive and (exact := self.run.pair.exact(self.x)) is not None:
            out["exact"] = exact_means(exact)
            out["exact_comparison"] = exact_comparison(
                self.estimate, {k: v.cpu() for k, v in exact.items()})
        return out


def predicts(run: Run, split: str) -> bool:
    """Whether points of ``split`` get the posterior predictive density rather than an
    evidence gap: they do where the run's guide was fitted to the training set and they are
    not that set."""
    return split != "train" and run.split == "train"


def whole_data_set(run: Run, x) -> bool:
    """Whether the run's pair has global latents on ``x``: its unit is then the data set, one
    log p(x_1..N), which a subset of the points would change (never subset silently)."""
    program = program_pair(run.model, run.guide, (x,), {}, run.options.data_plate, widen=True)
    with rng_preserved(), torch.no_grad():
        layout = inspect_pair(program.model, program.guide, program.data, program.data_plate)
    return not layout.per_datapoint


# Points AIS and BDMC take of a run whose unit is the data point (scripts/evaluate.py).
AIS_POINTS = 100


def subset_refused(run: Run, x, split: str, option: str, n: int) -> OptionError:
    """Why ``n`` points of a data set whose unit is the whole (global latents) are refused:
    they would be another data set, with another log p(x_1..N)."""
    return OptionError(
        option, f"{{option}} {n}: run {run.dir} has global latents, so its unit is the whole "
                f"{split} set (one log p(x_1..N), N={x.shape[0]}), and {n} of its points "
                f"would be another data set with another log p(x); leave {{option}} out to "
                f"take all {x.shape[0]}")


def split_points(run: Run, split: str, points: int | None = None) -> torch.Tensor:
    """``points`` of a run's ``split`` (a fixed random subset, seed 0; all by default; refused
    below all of a data set whose unit is the whole).  The training split is drawn as training
    sees it (a dynamic binarization: one draw)."""
    if split not in SPLITS:
        raise OptionError("split", f"must be one of {SPLITS}, got {split!r}")
    if split == "validation" and run.data.validation is None:
        raise OptionError("split", f"{{option}} validation: run {run.dir} has no validation "
                          "split (it was trained without a validation fraction, --val-fraction)")
    x = run.data.train_epoch() if split == "train" else getattr(run.data, split)
    # Held-out points' predictive densities are point by point; a data set is not.
    if points is not None and points < x.shape[0] and not predicts(run, split) \
            and whole_data_set(run, x):
        raise subset_refused(run, x, split, "max_points", points)
    return subset(x, points)


def annealing_points(run: Run, x, split: str, points: int | None):
    """The points AIS and BDMC take of ``x``: ``points`` of them (``AIS_POINTS`` by default,
    a fixed random subset), or all of a data set whose unit is the whole (refusing fewer)."""
    if not whole_data_set(run, x):
        return subset(x, points or AIS_POINTS)
    if points is not None and points < x.shape[0]:
        raise subset_refused(run, x, split, "points", points)
    return x


def diagnose(run: Run, x: torch.Tensor, split: str, *, num_samples: int,
             batch_size: int | None = 100, data_plate: str | None = None,
             progress: bool = False, distributed: Distributed = SINGLE,
             device: str | torch.device | None = None, defensive: float = 0.0,
             train_mode: bool = False, compiled: bool | None = None) -> Diagnosis:
    """The run's pair on the points ``x`` of ``split``, with ``num_samples`` draws per point
    (``defensive``, ``train_mode``, ``compiled``: as ``evaluate`` takes them)."""
    plate = data_plate or run.options.data_plate
    if predicts(run, split):
        with torch.no_grad():
            estimate = posterior_predictive(run.model, run.guide, x, num_samples=num_samples,
                                            batch_size=batch_size, data_plate=plate)
    else:
        estimate = evaluate(run.model, run.guide, x, num_samples=num_samples,
                            batch_size=batch_size, data_plate=plate, progress=progress,
                            distributed=distributed, device=device, defensive=defensive,
                            train_mode=train_mode, compiled=compiled)
    return Diagnosis(run, split, x, estimate)


def held_out_summary(run: Run, d: Diagnostics, x: torch.Tensor, *, num_samples: int,
                     batch_size: int | None = 100, data_plate: str | None = None) -> dict | None:
    """Beside the diagnostics ``d`` of a pair whose unit is the data set (global latents), what
    can be said of held-out points ``x``: their posterior predictive density.  None for other
    pairs, or without held-out points."""
    if d.unit != DATA_SET or not x.shape[0]:
        return None
    return diagnose(run, x, "test", num_samples=num_samples, batch_size=batch_size,
                    data_plate=data_plate).estimate.summary()


def final_evaluation_seconds(run: Run, x: torch.Tensor, processes: int = 1,
                             batch_size: int | None = None) -> float | None:
    """What the final evaluation of ``x`` (``batch_size`` points per pass, as it will run) will
    take here, timed without moving any random stream (None: the pair cannot be evaluated so).

    Two probes on all the points at K1 < K2 (the cost is fixed + K x per draw): a pair
    evaluated particle by particle pays per pass what a vectorized one pays per point and draw,
    and a pass's cost grows with the points in ways a few of them do not show (20 points
    scaled up said 1.4 s for 28 s on 2000 points).  K1 fills a chunk of evaluate's rows, so
    that the probes pay per draw what the evaluation will (with 5 and 15 draws a vectorized
    pair was said to take 4.7 times what it took); the first call, on a few points, warms up.
    The second probe is taken only where the first, scaled up (fixed costs counted K / K1
    times: an upper bound), says the evaluation may take over half of the
    ``ANNOUNCE_AFTER_SECONDS``; then the probes cost about (K1 + K2) / K of the evaluation."""
    k = run.config["num_samples"]
    per_pass = min(batch_size or x.shape[0], x.shape[0])
    low = min(k, max(5, -(-default_rows_per_chunk(torch.device("cpu")) // per_pass)))
    high = min(k, 3 * low)
    seconds = {}

    def timed(n, draws):
        start = time.perf_counter()
        evaluate(run.model, run.guide, x[:n], num_samples=draws, batch_size=batch_size,
                 data_plate=run.options.data_plate)
        return time.perf_counter() - start

    try:
        with rng_preserved():
            timed(min(x.shape[0], 20), 5)
            seconds[low] = timed(x.shape[0], low)
            # Only where it may be announced: below, the first probe's bound says it is short.
            if high > low and seconds[low] * k / low > ANNOUNCE_AFTER_SECONDS / 2:
                seconds[high] = timed(x.shape[0], high)
    except ElbogapError:
        return None
    if high == low or high not in seconds:
        return seconds[low] * k / low / processes
    per_draw = max(seconds[high] - seconds[low], 0.0) / (high - low)
    fixed = max(seconds[low] - low * per_draw, 0.0)
    return fixed + k * per_draw / processes


def final_summary(run: Run, progress: bool = True,
                  distributed: Distributed = SINGLE) -> dict | None:
    """Diagnose the trained pair (``num_samples`` draws, ``test_points`` points) and write
    ``diagnostics.json`` and the figures, then give up the run directory (its last write);
    the summary (None on ranks other than the first)."""
    config = run.config
    x = run.points(config.get("test_points"))
    if distributed.is_main:
        seconds = final_evaluation_seconds(run, x, distributed.world_size,
                                           config["eval_batch_size"])
        if seconds is not None and seconds > ANNOUNCE_AFTER_SECONDS:
            points = counted(x.shape[0], run.split + " point")
            print(f"final evaluation: {points} x K={config['num_samples']}, "
                  f"about {seconds / 60:.1f} min here (--num-samples and --test-points bound it)")
    diagnosis = diagnose(run, x, run.split, num_samples=config["num_samples"],
                         batch_size=config["eval_batch_size"], progress=progress,
                         distributed=distributed)
    if not distributed.is_main:
        return None
    summary = diagnosis.summary()
    if config["data"] == "synthetic":
        summary["data_generating_log_evidence"] = (
            synthetic_truth().log_evidence(run.data.test).double().mean().item())
    held_out = held_out_summary(run, diagnosis.estimate, run.data.test,
                                num_samples=config["num_samples"],
                                batch_size=config["eval_batch_size"])
    if held_out is not None:
        summary["held_out_predictive"] = held_out
    write_json_atomic(run.dir / DIAGNOSTICS, summary)
    for name, fig in run_figures(run, summary["kl_per_dim"]).items():
        save_figure(fig, run.dir / name)
    run.release()  # the run's last write
    return summary


def run_figures(run: Run, kl_per_dim: dict) -> dict:
    """The figures of a run by file name: curves over training, KL per dimension, and for image
    data reconstructions and prior samples read off the model's observed site."""
    history, data, held_out = run.history, run.data, run.split == "test"
    figures = {
        "elbo.png": plot_elbo_curves(history, run.options.objective),
        "reconstruction_kl.png": plot_terms_curves(history),
        "evidence_gap.png": plot_evidence_gap(history),
        "kl_per_dim.png": plot_kl_per_dim(kl_per_dim, data_set=any(
            r["diagnostics"].get("unit") == DATA_SET for r in history[-1:] if "diagnostics" in r)),
    }
    if data.image_shape is not None:
        # A guide with parameters per training point reconstructs only the training set.
        x = data.test if held_out else data.train
        shown = subset_indices(x.shape[0], 32)
        if held_out:
            x, shown = x[shown], torch.arange(len(shown))
        figures["reconstructions.png"] = plot_reconstructions(
            x[shown].numpy(), reconstruct(run.model, run.guide, x)[shown].numpy(),
            data.image_shape,
        )
        figures["prior_samples.png"] = plot_image_grid(
            sample_prior_means(run.model, data.test[:64]).numpy(), data.image_shape,
            "prior samples: E[x|z], z ~ p(z)",
        )
    return figures
