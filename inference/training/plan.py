"""Where a fitted pair can be diagnosed, found before any training: held-out points for an
amortized guide of local latents, else the training set the guide was fitted to."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..data.dataset import DATA_SEED, Dataset, subset
from ..foundations.conventions import inspect_pair
from ..foundations.data_plate import program_pair
from ..foundations.errors import ConventionError, OptionError
from ..foundations.pair_layout import PairLayout
from ..foundations.program_data import ProgramData, as_program_data
from ..foundations.rng import rng_preserved
from .options import FitOptions


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
        # Grey levels binarized afresh each epoch are scored as one fixed binarization: the
        # guide was fitted to 0/1 draws, and a Bernoulli refuses grey levels.
        return (data.train_epoch(torch.Generator().manual_seed(DATA_SEED))
                if data.dynamic_binarization else data.train)
    if split == "validation":
        return subset(data.validation, points)
    return subset(data.test, points)


def _runs_on(model: Callable, guide: Callable, x: torch.Tensor, data_plate: str) -> bool:
    try:
        inspect_pair(model, guide, x, data_plate)
    except ConventionError:
        return False
    return True


def located(model: Callable, guide: Callable, data: Dataset, options: FitOptions
            ) -> tuple[Callable, Callable, Dataset, FitOptions]:
    """The pair bound to its program's arguments, every split of ``data`` as those arguments
    (``ProgramData``) and ``options.data_plate`` the data plate found on the training split.
    With no data plate (the data one observation) every step takes all of it: batch size 1."""
    # Dynamically binarized grey levels become 0/1 each epoch: their support is the draws'.
    program = program_pair(model, guide, (data.train,), {}, options.data_plate,
                           check_support=not data.dynamic_binarization)
    data = replace(data, train=program.data, test=_like(data.test, program.data),
                   validation=_like(data.validation, program.data))
    options = replace(options, data_plate=program.data_plate,
                      batch_size=options.batch_size if program.data_plate else 1)
    return program.model, program.guide, data, options


def _like(split, train: ProgramData) -> ProgramData | None:
    """A held-out split as the program's arguments, batched as the training split is."""
    return None if split is None else as_program_data(split).like(train)


def plan_evaluation(model: Callable, guide: Callable, data: Dataset,
                    options: FitOptions, world_size: int = 1) -> EvaluationPlan:
    """Check the conventions on a minibatch (a clear error before any training) and find where
    the pair can be evaluated."""
    model, guide, data, options = located(model, guide, data, options)
    n, b = data.train.shape[0], options.batch_size
    plate = options.data_plate
    with rng_preserved(), torch.no_grad():
        minibatch_error = None
        try:
            layout = inspect_pair(model, guide, data.train[:b], plate)
            per_point = layout.subsample is None and b < n and not _runs_on(
                model, guide, data.train[: max(1, b // 2)], plate)
        except ConventionError as e:
            if b >= n:
                raise
            minibatch_error = e
            per_point = True  # (the guide was built on the whole set, locating its plate)
        if per_point:
            # Either the plate picks its own minibatch (and b rows were too few to see it), or
            # the guide has parameters per data point.
            try:
                layout = inspect_pair(model, guide, data.train, plate)
            except ConventionError:
                if minibatch_error is not None:
                    # It fails on the whole set too: not for want of rows; its own reason.
                    raise minibatch_error from None
                layout = None
            if layout is None or layout.subsample is None:
                raise OptionError(
                    "batch_size",
                    f"the guide runs on {b} rows but not on {max(1, b // 2)}: it has parameters "
                    f"per data point (an autoguide on latents inside plate '{plate}'), so a "
                    "minibatch would not line up with them; train it on the whole training "
                    f"set, {{option}} {n}, or subsample in the plate as Pyro does "
                    f"(pyro.plate('{plate}', len(x), subsample_size=B))"
                )
        if layout.subsample is not None:
            # The pair picks its own minibatch: it is handed the whole training set.
            layout = inspect_pair(model, guide, data.train, plate)
            if world_size > 1:
                raise OptionError(
                    "batch_size",
                    f"plate '{plate}' picks its own minibatch of x (subsample_size="
                    f"{layout.subsample}); data-parallel training shards x itself: write "
                    f"pyro.plate('{plate}', x.shape[0]) and use {{option}}")
        held_out = False
        if data.test is not None and data.test.shape[0] > 0 and layout.per_datapoint:
            test = data.test if layout.subsample is not None else data.test[:2]
            held_out = _runs_on(model, guide, test, plate)
    return EvaluationPlan(layout, held_out,
                          "validation" if data.validation is not None else "test")
