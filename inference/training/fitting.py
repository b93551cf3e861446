"""Fitting a model/guide pair with SVI, logging ELBO and diagnostics per epoch into a run directory.

Each step hands the pair a minibatch of x; sites in the data plate are scaled by N / B so that
Trace_ELBO's loss estimates minus the full-data ELBO (see ``inference.training.minibatch``), and Adam
takes one step on it (see ``inference.training.elbo_step``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from inference.data.datasets import Dataset, subset
from inference.diagnostics.evaluation import evaluate
from inference.diagnostics.traces import PairLayout, inspect_pair
from inference.errors import ConfigError, ConventionError, ElbogapError
from inference.outputs.atomic import write_text_atomic
from inference.training.checkpoint import rng_preserved, rng_state, save_checkpoint, set_rng_state
from inference.training.device import CPU, move_pair, resolve_device
from inference.training.distributed import SINGLE, Distributed
from inference.training.elbo_step import ELBO_ESTIMATORS, ELBOS, ElboStep
from inference.training.kl_weight import KLSchedule
from inference.training.parameters import pair_parameters
from inference.training.schedule import LR_SCHEDULES, LearningRateSchedule, epochs_since_best

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class TrainingError(ElbogapError):
    """Training cannot go on (for example the loss became NaN or infinite)."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C: the checkpoint of the last complete epoch stays as it was."""


@dataclass
class FitOptions:
    """Settings of ``fit``; every field is a command-line flag of ``scripts/fit.py``, and errors
    name a field by its flag."""

    epochs: int = 200
    batch_size: int = 100
    lr: float = 1e-3
    num_particles: int = 1
    elbo: str = "trace"
    renyi_alpha: float = 0.0  # --elbo iwae: 0 is IWAE; the Renyi bound of order alpha otherwise
    eval_every: int = 1
    eval_samples: int = 100
    eval_points: int = 500
    data_plate: str = "data"
    progress: bool = True
    time_budget: float | None = None  # seconds; training stops after the epoch that exceeds it
    seed: int = 0  # fixes the data order and dynamic binarization of every epoch
    max_nonfinite_steps: int = 10  # consecutive skipped steps before training stops
    jit: bool = True  # replay a checked recording of the loss (inference.training.compiled_loss)
    device: str = "cpu"  # auto, cpu, cuda or cuda:INDEX (inference.training.device)
    beta: float = 1.0  # weight of the KL term (inference.training.kl_weight)
    kl_warmup: int = 0  # epochs over which that weight rises linearly from 0 to beta
    lr_schedule: str = "constant"  # constant, cosine, step or plateau (inference.training.schedule)
    lr_factor: float = 0.1  # step and plateau: the learning rate's multiplier at each decay
    lr_step_epochs: int = 50  # step: epochs between decays
    lr_patience: int = 10  # plateau: epochs without a rise of the watched ELBO before a decay
    clip_norm: float | None = None  # clip the gradients' global norm to this
    patience: int | None = None  # stop after this many epochs without a better validation ELBO

    def check(self, num_train: int, world_size: int = 1) -> None:
        for name in ("epochs", "batch_size", "num_particles", "eval_every", "eval_samples",
                     "eval_points"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if not (isinstance(self.lr, float | int) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ConfigError(f"--time-budget must be positive, got {self.time_budget}")
        if not isinstance(self.data_plate, str) or not self.data_plate:
            raise ConfigError(f"--data-plate must be a plate's name, got {self.data_plate!r}")
        if self.elbo not in ELBOS:
            raise ConfigError(f"--elbo must be one of {sorted(ELBOS)}, got {self.elbo!r}")
        if not (self.renyi_alpha >= 0 and self.renyi_alpha != 1):
            raise ConfigError(f"--renyi-alpha must be >= 0 and not 1 (alpha = 1 is the ELBO: "
                              f"--elbo trace), got {self.renyi_alpha}")
        for name in ("beta", "clip_norm"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, float | int) and math.isfinite(value)
                                          and value > 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, "
                                  f"got {value}")
        for name, least in (("kl_warmup", 0), ("lr_step_epochs", 1), ("lr_patience", 0),
                            ("patience", 1)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < least):
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= {least}, "
                                  f"got {value}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"--lr-schedule must be one of {list(LR_SCHEDULES)}, "
                              f"got {self.lr_schedule!r}")
        if not (isinstance(self.lr_factor, float | int) and 0 < self.lr_factor < 1):
            raise ConfigError(f"--lr-factor must be between 0 and 1, got {self.lr_factor}")
        if self.elbo == "iwae" and self.kl_schedule.active:
            raise ConfigError("--beta and --kl-warmup weight the KL term of the ELBO; the bound "
                              "of --elbo iwae has no separate KL term: train it at beta 1")
        if self.batch_size * world_size > num_train:
            per = f" x {world_size} processes" if world_size > 1 else ""
            raise ConfigError(
                f"--batch-size {self.batch_size}{per} is larger than the training set "
                f"({num_train} points)"
            )

    @property
    def kl_schedule(self) -> KLSchedule:
        return KLSchedule(self.beta, self.kl_warmup)

    @property
    def objective(self) -> str:
        """What training maximizes, in words (the label of its curve)."""
        if self.elbo == "iwae":
            if self.renyi_alpha:
                return f"Renyi bound, alpha = {self.renyi_alpha:g}, K = {self.num_particles}"
            return f"IWAE bound, K = {self.num_particles}"
        if self.kl_schedule.active:
            warmup = f", warm-up {self.kl_warmup} epochs" if self.kl_warmup else ""
            return f"ELBO with KL weight {self.beta:g}{warmup}"
        return "ELBO"


def _minibatches(x_epoch: torch.Tensor, order: torch.Tensor, global_batch: int,
                 distributed: Distributed, own_minibatch: int | None):
    """``(this rank's minibatch, global minibatch size)`` for each step of an epoch.  A pair
    whose plate picks its own minibatch (``pyro.plate("data", len(x), subsample_size=B)``) is
    handed the whole training set N / B times, as Pyro's SVI would."""
    n = x_epoch.shape[0]
    if own_minibatch is not None:
        for _ in range(math.ceil(n / own_minibatch)):
            yield x_epoch, n
        return
    for s in range(0, n, global_batch):
        indices = order[s : s + global_batch]
        yield x_epoch[indices[distributed.shard(len(indices))]], len(indices)


def _train_epoch(
    step: ElboStep, data: Dataset, epoch: int, options: FitOptions, distributed: Distributed,
    own_minibatch: int | None = None, device: torch.device = CPU,
) -> float:
    """One pass over the training set; the mean loss of its steps with a finite loss.  Each
    step's KL weight is the schedule's at that step.

    The epoch's order (and dynamic binarization) is drawn from the seed and the epoch number
    alone, so that every rank and every resumed run sees the same one.
    """
    n = data.train.shape[0]
    global_batch = options.batch_size * distributed.world_size
    epoch_rng = torch.Generator().manual_seed(options.seed * 1_000_003 + epoch)
    # Drawn on the CPU (its generator is), then moved once per epoch.
    x_epoch = data.train_epoch(epoch_rng).to(device)
    order = torch.randperm(n, generator=epoch_rng)
    step.compiled.recheck()
    total, steps = 0.0, 0
    steps_per_epoch = math.ceil(n / (own_minibatch or global_batch))
    minibatches = _minibatches(x_epoch, order, global_batch, distributed, own_minibatch)
    for index, (batch, size) in enumerate(minibatches, start=1):
        loss = step(batch, size, options.kl_schedule.weight(epoch, index, steps_per_epoch))
        if step.consecutive_skipped >= options.max_nonfinite_steps:
            raise TrainingError(
                f"{step.consecutive_skipped} steps in a row had a loss or gradient that is not "
                f"finite (last loss {loss}), up to epoch {epoch}, step {index}: the learning "
                f"rate ({options.lr}) may be too large, or a scale parameter reached zero. Those "
                "steps were skipped"
            )
        if math.isfinite(loss):
            total += loss
            steps += 1
    if steps == 0:
        raise TrainingError(f"no step of epoch {epoch} had a finite loss")
    return total / steps


def _what_is_kept(run_dir: Path | None, epoch: int) -> str:
    if run_dir is None:
        return "no run directory was given, so nothing was saved"
    if epoch > 1:
        return f"{run_dir / CHECKPOINT} of epoch {epoch - 1}, the last complete one, is intact"
    return "no epoch was completed, so there is no checkpoint yet"


@dataclass
class EvaluationPlan:
    """Where a fitted pair can be diagnosed.  ``held_out``: per data point on the test split
    (an amortized guide of local latents).  Otherwise on the training set, the data the guide
    was fitted to: the unit is the data set for global latents, and a guide with parameters per
    training point (an autoguide on local latents) has no q for test points."""

    layout: PairLayout
    held_out: bool
    # Held-out points watched during training: the validation split when the data has one.
    monitored: str = "test"

    @property
    def split(self) -> str:
        return "test" if self.held_out else "train"

    def eval_x(self, data: Dataset, points: int | None = None) -> torch.Tensor:
        return diagnosed_points(data, self.monitored if self.held_out else "train", points)


def diagnosed_points(data: Dataset, split: str, points: int | None = None) -> torch.Tensor:
    """The points a pair's diagnostics cover: ``points`` of the test (or validation) split, a
    fixed random subset, or the whole training set the guide was fitted to."""
    if split == "train":
        return data.train
    if split == "validation":
        return subset(data.validation, points)
    return subset(data.test, points)


def _runs_on(model: Callable, guide: Callable, x: torch.Tensor, data_plate: str) -> bool:
    try:
        inspect_pair(model, guide, x, data_plate)
    except ConventionError:
        return False
    return True


def plan_evaluation(model: Callable, guide: Callable, data: Dataset,
                    options: FitOptions, world_size: int = 1) -> EvaluationPlan:
    """Check the conventions on a minibatch (a clear error before any training) and find where
    the pair can be evaluated."""
    n, b = data.train.shape[0], options.batch_size
    plate = options.data_plate
    with rng_preserved(), torch.no_grad():
        layout = inspect_pair(model, guide, data.train[:b], plate)
        if layout.subsample is None and b < n and not _runs_on(
                model, guide, data.train[: max(1, b // 2)], plate):
            # Either the plate picks its own minibatch (and b rows were too few to see it), or
            # the guide has parameters per data point.
            try:
                layout = inspect_pair(model, guide, data.train, plate)
            except ConventionError:
                layout = None
            if layout is None or layout.subsample is None:
                raise ConfigError(
                    f"the guide runs on {b} rows but not on {max(1, b // 2)}: it has parameters "
                    f"per data point (an autoguide on latents inside plate '{plate}'), so a "
                    "minibatch would not line up with them; train it on the whole training "
                    f"set, --batch-size {n}, or subsample in the plate as Pyro does "
                    f"(pyro.plate('{plate}', len(x), subsample_size=B))"
                )
        if layout.subsample is not None:
            # The pair picks its own minibatch: it is handed the whole training set.
            layout = inspect_pair(model, guide, data.train, plate)
            if world_size > 1:
                raise ConfigError(
                    f"plate '{plate}' picks its own minibatch of x (subsample_size="
                    f"{layout.subsample}); data-parallel training shards x itself: write "
                    f"pyro.plate('{plate}', x.shape[0]) and use --batch-size")
        test = data.test if layout.subsample is not None else data.test[:2]
        held_out = (layout.per_datapoint and data.test.shape[0] > 0
                    and _runs_on(model, guide, test, plate))
    if options.num_particles > 1 and not layout.vectorized:
        raise ConfigError(
            f"--num-particles {options.num_particles}: the pair does not broadcast over a leading "
            "particle dimension (see README, Conventions), so Pyro cannot vectorize its "
            "particles; use --num-particles 1"
        )
    return EvaluationPlan(layout, held_out,
                          "validation" if data.validation is not None else "test")


BEST = "best.pt"


class _EarlyStopping:
    """Stop once the watched (validation) ELBO has not risen for ``patience`` epochs, and leave
    the pair with the parameters of its best epoch.  Those are kept in memory and, with a run
    directory, in ``best.pt``, from which a resumed run takes them back."""

    def __init__(self, patience: int, run_dir: Path | None, writes: bool = True):
        self.patience, self.run_dir, self.writes = patience, run_dir, writes
        self.best: dict[str, torch.Tensor] | None = None
        self.best_epoch: int | None = None

    @classmethod
    def check(cls, options: FitOptions, plan: EvaluationPlan, run_dir: Path | None,
              writes: bool = True) -> _EarlyStopping | None:
        if options.patience is None:
            return None
        if not (plan.held_out and plan.monitored == "validation"):
            why = ("the pair is diagnosed on its training set" if not plan.held_out
                   else "the data has no validation split: pass --val-fraction")
            raise ConfigError(f"--patience stops on the ELBO of a validation split, but {why} "
                              "(the test set must not choose the model)")
        return cls(options.patience, run_dir, writes)

    def restore(self, history: list[dict], watched: str,
                current: dict[str, torch.Tensor]) -> None:
        if not history:
            return
        self.best_epoch = history[len(history) - 1 - epochs_since_best(
            [r[watched] for r in history])]["epoch"]
        path = self.run_dir / BEST if self.run_dir is not None else None
        if self.best_epoch == history[-1]["epoch"]:
            self.best = {name: p.detach().clone() for name, p in current.items()}
        elif path is not None and path.is_file():
            self.best = torch.load(path, map_location="cpu", weights_only=False)["params"]
        else:
            raise ConfigError(f"--patience: the run's best epoch was {self.best_epoch}, but its "
                              f"parameters are not in {path}")

    def after_epoch(self, epoch: int, history: list[dict], watched: str,
                    current: dict[str, torch.Tensor]) -> bool:
        """Keep this epoch's parameters if it is the best so far; whether to stop now."""
        since = epochs_since_best([r[watched] for r in history])
        if since == 0:
            self.best_epoch = epoch
            self.best = {name: p.detach().clone() for name, p in current.items()}
            if self.run_dir is not None and self.writes:
                save_checkpoint(self.run_dir / BEST, params=current, epoch=epoch)
        return since >= self.patience

    def stop(self, current: dict[str, torch.Tensor]) -> dict:
        with torch.no_grad():
            for name, p in current.items():
                p.copy_(self.best[name].to(p.device))
        return {"best_epoch": self.best_epoch, "patience": self.patience}


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    step: ElboStep | None = None
    plan: EvaluationPlan | None = None


def fit(
    model: Callable,
    guide: Callable,
    data: Dataset,
    options: FitOptions | None = None,
    run_dir: str | Path | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    distributed: Distributed = SINGLE,
    resume: dict | None = None,
) -> FitResult:
    """Train ``model`` and ``guide`` on ``data.train``; evaluate on ``data.test`` every epoch.

    Every epoch logs the train ELBO per data point (mean of the SVI losses / N) and the test
    ELBO (one guide draw, analytic KL); every ``eval_every`` epochs also the full diagnostics of
    ``evaluate`` on the first ``eval_points`` test points with ``eval_samples`` draws.  With
    ``run_dir`` the history goes to ``metrics.jsonl`` and parameters and optimizer state to
    ``checkpoint.pt`` after every epoch (both written atomically).  Parameters live in Pyro's
    global param store, which ``fit`` does not clear.  ``on_epoch(record)`` may add entries to
    each epoch's record before it is written (for example closed-form values to compare with).

    Under torchrun (``distributed``) each global minibatch is ``batch_size`` points per process,
    split across the ranks; gradients are averaged so that a step equals the single-process step
    on the global minibatch; metrics are global; only rank 0 writes files.  The data order of
    every epoch is a permutation drawn from ``options.seed`` and the epoch number, the same on
    every rank and in every rerun.

    ``resume`` continues a run: the state ``load_checkpoint`` returned (parameters already
    restored) with the run's earlier records under ``"history"``.  Adam's moments, the epoch
    counter and every random stream continue where the checkpoint left them, so a resumed run
    writes the numbers the uninterrupted run would have written.
    """
    options = options or FitOptions()
    n = data.train.shape[0]
    options.check(n, distributed.world_size)
    # The conventions, checked once up front: a clear error now rather than a quietly wrong fit.
    plan = plan_evaluation(model, guide, data, options, distributed.world_size)
    device = resolve_device(options.device)
    # Tracing the pair (plan_evaluation) created its parameters on the CPU; the optimizer
    # below must hold them where they will live.
    move_pair(model, guide, device)
    # Every rank reads the run directory (a resumed early stop's best.pt); rank 0 alone writes.
    run_path = Path(run_dir) if run_dir is not None else None
    run_dir = run_path if distributed.is_main else None
    step = ElboStep(model, guide, n, lr=options.lr, elbo=options.elbo,
                    num_particles=options.num_particles, data_plate=options.data_plate,
                    distributed=distributed, jit=options.jit,
                    max_plate_nesting=plan.layout.max_plate_nesting,
                    renyi_alpha=options.renyi_alpha, kl_weighted=options.kl_schedule.active,
                    clip_norm=options.clip_norm)
    result = FitResult(step=step, plan=plan)
    stopping = _EarlyStopping.check(options, plan, run_path, writes=distributed.is_main)
    first_epoch = 1
    if resume is not None:
        step.load_state_dict(resume["optimizer"])
        first_epoch = resume["epoch"] + 1
        if (stopped := resume.get("stopped_early")) is not None:
            # Early stopping ended this run; its checkpoint holds the best epoch's parameters.
            first_epoch = options.epochs + 1
            if distributed.is_main and options.progress:
                tqdm.write(f"the run stopped early after epoch {resume['epoch']} (no better "
                           f"validation ELBO for {stopped['patience']} epochs since epoch "
                           f"{stopped['best_epoch']}): nothing left to train")
        result.history = [r for r in resume.get("history", []) if r["epoch"] < first_epoch]
        if result.history:
            # The step counters the records carry go on from where they were.
            step.skipped = result.history[-1].get("skipped_steps", 0)
            step.clipped = result.history[-1].get("clipped_steps", 0)
        per_rank = resume.get("rng_per_rank")
        set_rng_state(per_rank[distributed.rank] if per_rank and
                      len(per_rank) == distributed.world_size else resume["rng"])
    elif distributed.enabled:
        # Parameters were initialized alike on every rank; the noise of the draws must differ.
        torch.manual_seed(options.seed * 1_000_003 + distributed.rank + 1)
    eval_x = plan.eval_x(data, options.eval_points).to(device)
    watched = f"{plan.monitored}_elbo"
    schedule = LearningRateSchedule(options.lr_schedule, options.epochs, options.lr_factor,
                                    options.lr_step_epochs, options.lr_patience)
    # plateau watches held-out data only where that is a validation split, never the test set.
    plateau_key = watched if plan.held_out and plan.monitored == "validation" else "train_objective"
    if stopping is not None and resume is not None:
        stopping.restore(result.history, watched, pair_parameters(model, guide))
    held_out_x = (data.validation if plan.monitored == "validation" else data.test).to(device)
    epochs = tqdm(range(first_epoch, options.epochs + 1), desc="fit", unit="epoch",
                  initial=first_epoch - 1, total=options.epochs,
                  disable=not (options.progress and distributed.is_main))
    fit_start = time.perf_counter()
    epoch = first_epoch - 1
    # Off from the start (--no-jit, or a resumed run that had fallen back) is no news.
    eager_told = not step.compiled.enabled
    try:
        for epoch in epochs:
            start = time.perf_counter()
            step.set_lr_multiplier(schedule.multiplier(
                epoch, [r.get(plateau_key, r.get("train_elbo")) for r in result.history]))
            try:
                train_loss = _train_epoch(step, data, epoch, options, distributed,
                                          plan.layout.subsample, device)
            except TrainingError as e:
                raise TrainingError(f"{e}; {_what_is_kept(run_dir, epoch)}") from None
            if not (eager_told or step.compiled.enabled) and distributed.is_main:
                # Slower, not wrong: worth one line, not an error.
                tqdm.write(f"note: training steps run the pair eagerly: {step.compiled.reason}")
                eager_told = True
            objective = -train_loss / n
            record = {
                "epoch": epoch,
                # What training maximized; the ELBO itself only where that is what it was.
                "train_objective": objective,
                "train_elbo": objective if options.elbo in ELBO_ESTIMATORS
                and options.kl_schedule.is_elbo(epoch) else None,
                watched: evaluate(model, guide, held_out_x, num_samples=1, batch_size=1000,
                                  data_plate=options.data_plate,
                                  distributed=distributed).elbo.mean().item()
                if plan.held_out else None,
                "seconds": time.perf_counter() - start,
                "skipped_steps": step.skipped,
            }
            if options.kl_schedule.active:
                record["kl_weight"] = options.kl_schedule.weight(epoch, 1, 1)
            if options.lr_schedule != "constant":
                record["lr"] = options.lr * step.lr_multiplier
            if options.clip_norm is not None:
                record["clipped_steps"] = step.clipped
            stop = stopping is not None and stopping.after_epoch(
                epoch, result.history + [record], watched, pair_parameters(model, guide))
            # Rank 0's clock decides, so that every rank stops after the same epoch.
            out_of_time = distributed.mean(float(
                distributed.is_main and options.time_budget is not None
                and time.perf_counter() - fit_start >= options.time_budget
            )) > 0
            if epoch % options.eval_every == 0 or epoch == options.epochs or out_of_time:
                diagnostics = evaluate(
                    model, guide, eval_x, num_samples=options.eval_samples,
                    data_plate=options.data_plate, distributed=distributed,
                )
                record["diagnostics"] = {"split": plan.monitored if plan.held_out else "train",
                                         **diagnostics.summary()}
            if stop:
                # The pair ends as it was at its best epoch, and the checkpoint with it.
                record["early_stop"] = stopping.stop(pair_parameters(model, guide))
            if on_epoch is not None:
                on_epoch(record)
            result.history.append(record)
            epochs.set_postfix(train_objective=f"{objective:.2f}", **(
                {watched: f"{record[watched]:.2f}"} if plan.held_out else {}))
            rng_per_rank = distributed.gather(rng_state())
            if run_dir is not None:
                write_text_atomic(
                    run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in result.history)
                )
                save_checkpoint(run_dir / CHECKPOINT, step.state_dict(),
                                params=pair_parameters(model, guide), epoch=epoch,
                                rng_per_rank=rng_per_rank,
                                stopped_early=record.get("early_stop"))
            if out_of_time or stop:
                break
    except KeyboardInterrupt:
        where = (f"{run_dir / CHECKPOINT} holds epoch {epoch - 1}; continue with --resume {run_dir}"
                 if run_dir is not None and epoch > first_epoch else "no epoch was completed")
        raise TrainingInterrupted(f"interrupted during epoch {epoch}: {where}") from None
    return result
