"""Fitting a model/guide pair with SVI, logging ELBO and diagnostics per epoch into a run directory.

Each step hands the pair a minibatch of x; sites in the data plate are scaled by N / B so that
Trace_ELBO's loss estimates minus the full-data ELBO (see ``elbogap.training.minibatch``), and Adam
takes one step on it (see ``elbogap.training.elbo_step``).  A run goes through its phases in
``_Training``: set up (or resume), train an epoch, record it, save it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..data.dataset import Dataset
from ..data.training_data import as_dataset
from ..diagnostics.evaluation import evaluate
from ..foundations.atomic import write_text_atomic
from ..foundations.device import CPU, move_pair, resolve_device
from ..foundations.distributed import SINGLE, Distributed
from ..foundations.errors import ElbogapError, OptionError
from ..foundations.parameter_scope import in_scope_of
from ..foundations.progress import tqdm
from ..foundations.rng import rng_state, seeded, set_rng_state
from ..foundations.strict_json import strict_json
from .checkpoint import checkpoint_records, save_checkpoint
from .early_stopping import EarlyStopping
from .elbo_step import ELBO_ESTIMATORS, ElboStep
from .options import FitOptions
from .parameters import pair_parameters
from .plan import EvaluationPlan, located, plan_evaluation
from .schedule import LearningRateSchedule

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class TrainingError(ElbogapError):
    """Training cannot go on (for example the loss became NaN or infinite)."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C: the checkpoint of the last complete epoch stays as it was."""


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    step: ElboStep | None = None
    plan: EvaluationPlan | None = None

    def __repr__(self) -> str:
        if not self.history:
            return "FitResult(no epoch trained)"
        last = self.history[-1]
        shown = ", ".join(f"{key} {last[key]:.3f}" for key in
                          ("train_objective", "test_elbo", "validation_elbo")
                          if isinstance(last.get(key), float))
        return f"FitResult({len(self.history)} epochs; last epoch {last['epoch']}: {shown})"


# eval_every None: the full diagnostics take at most about this share of the training time.
DIAGNOSTICS_SHARE = 0.1


def fit(
    model: Callable,
    guide: Callable,
    data: Dataset | Any,
    options: FitOptions | None = None,
    run_dir: str | Path | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    distributed: Distributed = SINGLE,
    resume: dict | None = None,
    on_saved: Callable[[], None] | None = None,
) -> FitResult:
    """Train ``model`` and ``guide`` on ``data.train``; evaluate on ``data.test`` every epoch.

    ``data`` is a ``Dataset``, or the program's arguments the way Pyro's ``SVI.step`` takes
    them, for one data set: a tensor, a tuple or dict of tensors, a torch ``Dataset`` or a
    ``DataLoader`` (whose ``batch_size`` is then the minibatch size; see
    ``elbogap.data.training_data``).  The data plate is found (``options.data_plate`` only
    disambiguates); arguments whose rows it indexes are split into minibatches, the rest passed
    whole.  A program with no data plate (the data one observation) trains on all of it per step.

    Every epoch logs the train ELBO per data point (mean of the SVI losses / N) and the test
    ELBO (one guide draw, analytic KL); also the full diagnostics of ``evaluate`` on
    ``eval_points`` test points with ``eval_samples`` draws: every ``eval_every`` epochs, or by
    default (None) at the first and last epoch and in between as often as keeps them within
    10 % of the training time (``DIAGNOSTICS_SHARE``).  They draw from a stream of their own,
    so which epochs are diagnosed never changes the training.  With
    ``run_dir`` the history goes to ``metrics.jsonl`` and parameters and optimizer state to
    ``checkpoint.pt`` after every epoch (both written atomically).  Parameters live in Pyro's
    global param store, which ``fit`` does not clear (a loaded run's pair: its own, see
    ``elbogap.foundations.parameter_scope``).  ``on_epoch(record)`` may add entries to
    each epoch's record before it is written (for example closed-form values to compare with);
    ``on_saved()`` is called once each epoch's checkpoint is written.

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
    data, loader_batch_size = as_dataset(data)
    options = options or FitOptions()
    if loader_batch_size is not None:
        options = replace(options, batch_size=loader_batch_size)
    # A loaded run's pair trains on its own parameters (``parameter_scope``), all of fit long.
    with in_scope_of(model, guide):
        training = _Training(model, guide, data, options, run_dir, distributed)
        first_epoch = training.resume(resume) if resume is not None else training.start()
        epochs = training.progress(first_epoch)
        epoch = first_epoch - 1
        try:
            for epoch in epochs:
                record, stop = training.record(epoch, training.train_epoch(epoch))
                if on_epoch is not None:
                    on_epoch(record)
                training.save(record)
                if on_saved is not None:
                    on_saved()
                epochs.set_postfix(**training.postfix(record))
                if stop:
                    break
        except KeyboardInterrupt:
            raise TrainingInterrupted(training.interrupted(epoch, first_epoch)) from None
        return training.result


class _Training:
    """One call of ``fit``: its checked settings, the step, and the run's history so far."""

    def __init__(self, model: Callable, guide: Callable, data: Dataset, options: FitOptions,
                 run_dir: str | Path | None, distributed: Distributed):
        if torch.is_tensor(data.train):
            # Settings that cannot work are refused before the pair is run at all.
            options.check(data.train.shape[0], distributed.world_size)
        model, guide, data, options = located(model, guide, data, options)
        self.model, self.guide, self.data, self.options = model, guide, data, options
        self.distributed = distributed
        self.n = data.train.shape[0]
        options.check(self.n, distributed.world_size)
        # The conventions, checked once up front: a clear error now rather than a quietly wrong fit.
        self.plan = plan_evaluation(model, guide, data, options, distributed.world_size)
        self.device = resolve_device(options.device)
        # Tracing the pair (plan_evaluation) created its parameters on the CPU; the optimizer
        # below must hold them where they will live.
        move_pair(model, guide, self.device)
        # Every rank reads the run directory (a resumed early stop's best.pt); rank 0 alone writes.
        run_path = Path(run_dir) if run_dir is not None else None
        self.run_dir = run_path if distributed.is_main else None
        if self.run_dir is not None:
            # Made now, not found missing after the first epoch's training.
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OptionError("run_dir", f"{{option}} {run_dir}: cannot create it "
                                  f"({e.strerror or e})") from None
        self.step = ElboStep(model, guide, self.n, lr=options.lr, elbo=options.elbo,
                             num_particles=options.num_particles, data_plate=options.data_plate,
                             distributed=distributed, jit=options.jit,
                             max_plate_nesting=self.plan.layout.max_plate_nesting,
                             renyi_alpha=options.renyi_alpha,
                             kl_weighted=options.kl_schedule.active, clip_norm=options.clip_norm,
                             broadcasts=self.plan.layout.vectorized)
        self.result = FitResult(step=self.step, plan=self.plan)
        self.stopping = EarlyStopping.check(options, self.plan, run_path,
                                            writes=distributed.is_main)
        self.eval_x = self.plan.eval_x(data, options.eval_points).to(self.device)
        self.watched = f"{self.plan.monitored}_elbo"
        self.schedule = LearningRateSchedule(options.lr_schedule, options.epochs,
                                             options.lr_factor, options.lr_step_epochs,
                                             options.lr_patience)
        # plateau watches held-out data only where that is a validation split, never the test set.
        self.plateau_key = (self.watched if self.plan.held_out
                            and self.plan.monitored == "validation" else "train_objective")
        held_out = data.validation if self.plan.monitored == "validation" else data.test
        self.held_out_x = held_out.to(self.device) if held_out is not None else None
        self.started = time.perf_counter()
        # Seconds spent training and on the full diagnostics (eval_every None keeps the second
        # within DIAGNOSTICS_SHARE of the first).
        self.train_seconds, self.diagnostics_seconds = 0.0, 0.0
        self.last_diagnostics: float | None = None
        # Off from the start (jit=False, or a resumed run that had fallen back) is no news.
        self.eager_told = not self.step.compiled.enabled

    # -- set up ------------------------------------------------------------------------------

    def start(self) -> int:
        """The first epoch of a new run."""
        if self.distributed.enabled:
            # Parameters were initialized alike on every rank; the noise of the draws must differ.
            torch.manual_seed(self.options.seed * 1_000_003 + self.distributed.rank + 1)
        return 1

    def resume(self, state: dict) -> int:
        """Pick up a checkpoint's state: Adam's moments, the history, the step counters, the
        random streams and early stopping's best epoch.  Returns the first epoch to train."""
        options, distributed = self.options, self.distributed
        self.step.load_state_dict(state["optimizer"])
        first_epoch = state["epoch"] + 1
        if (stopped := state.get("stopped_early")) is not None:
            # Early stopping ended this run; its checkpoint holds the best epoch's parameters.
            first_epoch = options.epochs + 1
            if distributed.is_main and options.progress:
                tqdm.write(f"the run stopped early after epoch {state['epoch']} (no better "
                           f"validation ELBO for {stopped['patience']} epochs since epoch "
                           f"{stopped['best_epoch']}): nothing left to train")
        history = state.get("history", [])[:checkpoint_records(state)]
        self.result.history = history
        if history:
            # The step counters the records carry go on from where they were.
            self.step.skipped = history[-1].get("skipped_steps", 0)
            self.step.clipped = history[-1].get("clipped_steps", 0)
        per_rank = state.get("rng_per_rank")
        set_rng_state(per_rank[distributed.rank] if per_rank and
                      len(per_rank) == distributed.world_size else state["rng"])
        if self.stopping is not None:
            self.stopping.restore(history, self.watched, pair_parameters(self.model, self.guide))
        return first_epoch

    def progress(self, first_epoch: int) -> tqdm:
        options = self.options
        return tqdm(range(first_epoch, options.epochs + 1), desc="fit", unit="epoch",
                    initial=first_epoch - 1, total=options.epochs,
                    disable=not (options.progress and self.distributed.is_main))

    # -- an epoch ----------------------------------------------------------------------------

    def train_epoch(self, epoch: int) -> float:
        """One pass over the training set at the schedule's learning rate: its mean loss."""
        self.epoch_started = time.perf_counter()
        history = self.result.history
        self.step.set_lr_multiplier(self.schedule.multiplier(
            epoch, [r.get(self.plateau_key, r.get("train_elbo")) for r in history]))
        try:
            loss = _train_epoch(self.step, self.data, epoch, self.options, self.distributed,
                                self.plan.layout.subsample, self.device)
        except TrainingError as e:
            raise TrainingError(f"{e}; {_what_is_kept(self.run_dir, epoch)}") from None
        if not (self.eager_told or self.step.compiled.enabled) and self.distributed.is_main:
            # Slower, not wrong: worth one line, not an error.
            tqdm.write(f"note: training steps run the pair eagerly: {self.step.compiled.reason}")
            self.eager_told = True
        return loss

    def record(self, epoch: int, train_loss: float) -> tuple[dict, bool]:
        """The epoch's record (objective, held-out ELBO, controls, diagnostics every
        ``eval_every`` epochs), and whether training stops after it."""
        options, step, distributed = self.options, self.step, self.distributed
        objective = -train_loss / self.n
        record = {
            "epoch": epoch,
            # What training maximized; the ELBO itself only where that is what it was.
            "train_objective": objective,
            "train_elbo": objective if options.elbo in ELBO_ESTIMATORS
            and options.kl_schedule.is_elbo(epoch) else None,
            self.watched: evaluate(self.model, self.guide, self.held_out_x, num_samples=1,
                                   batch_size=1000, data_plate=options.data_plate,
                                   distributed=distributed).elbo.mean().item()
            if self.plan.held_out else None,
            "seconds": time.perf_counter() - self.epoch_started,
            "skipped_steps": step.skipped,
        }
        if options.kl_schedule.active:
            record["kl_weight"] = options.kl_schedule.weight(epoch, 1, 1)
        if options.lr_schedule != "constant":
            record["lr"] = options.lr * step.lr_multiplier
        if options.clip_norm is not None:
            record["clipped_steps"] = step.clipped
        if getattr(step.loss, "note", None):
            record["particles"] = step.loss.note
        parameters = pair_parameters(self.model, self.guide)
        stop = self.stopping is not None and self.stopping.after_epoch(
            epoch, self.result.history + [record], self.watched, parameters)
        # Rank 0's clock decides, so that every rank stops after the same epoch.
        out_of_time = distributed.mean(float(
            distributed.is_main and options.time_budget is not None
            and time.perf_counter() - self.started >= options.time_budget
        )) > 0
        self.train_seconds += record["seconds"]
        if self.diagnostics_due(epoch) or epoch == options.epochs or out_of_time:
            started = time.perf_counter()
            # On a stream of its own: whether an epoch is diagnosed (by the clock, with
            # eval_every None) must not change the draws of the training that follows.
            with seeded(options.seed * 1_000_003 + epoch * 7_919 + distributed.rank,
                        self.device):
                diagnostics = evaluate(self.model, self.guide, self.eval_x,
                                       num_samples=options.eval_samples,
                                       data_plate=options.data_plate, distributed=distributed)
            record["diagnostics"] = {"split": self.plan.monitored if self.plan.held_out
                                     else "train", **diagnostics.summary()}
            self.last_diagnostics = time.perf_counter() - started
            self.diagnostics_seconds += self.last_diagnostics
        if stop:
            # The pair ends as it was at its best epoch, and the checkpoint with it.
            record["early_stop"] = self.stopping.stop(parameters)
        return record, stop or out_of_time

    def diagnostics_due(self, epoch: int) -> bool:
        """Whether this epoch gets the full diagnostics: every ``eval_every`` epochs, or by
        default (None) whenever they keep within ``DIAGNOSTICS_SHARE`` of the training time so
        far (the first epoch always, to time them; the last always).  Rank 0's clock decides."""
        every = self.options.eval_every
        if every is not None:
            return epoch % every == 0
        due = (self.last_diagnostics is None or self.diagnostics_seconds + self.last_diagnostics
               <= DIAGNOSTICS_SHARE * self.train_seconds)
        return self.distributed.mean(float(self.distributed.is_main and due)) > 0

    def save(self, record: dict) -> None:
        """The record joins the history; rank 0 writes ``metrics.jsonl`` and the checkpoint."""
        self.result.history.append(record)
        rng_per_rank = self.distributed.gather(rng_state())
        if self.run_dir is None:
            return
        history = self.result.history
        write_text_atomic(self.run_dir / METRICS, "".join(strict_json(r) + "\n" for r in history))
        save_checkpoint(self.run_dir / CHECKPOINT, self.step.state_dict(),
                        params=pair_parameters(self.model, self.guide), epoch=record["epoch"],
                        rng_per_rank=rng_per_rank, stopped_early=record.get("early_stop"),
                        # How many records of metrics.jsonl this checkpoint goes with.
                        records=len(history))

    def postfix(self, record: dict) -> dict[str, str]:
        shown = {"train_objective": f"{record['train_objective']:.2f}"}
        if self.plan.held_out:
            shown[self.watched] = f"{record[self.watched]:.2f}"
        return shown

    def interrupted(self, epoch: int, first_epoch: int) -> str:
        where = (f"{self.run_dir / CHECKPOINT} holds epoch {epoch - 1}; continue with --resume "
                 f"{self.run_dir}" if self.run_dir is not None and epoch > first_epoch
                 else "no epoch was completed")
        return f"interrupted during epoch {epoch}: {where}"


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
