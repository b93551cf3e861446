"""Learning-rate schedules and early stopping, as pure functions of the epoch and the history.

Each epoch's learning rate is ``lr × multiplier(epoch, watched)``, with ``watched`` the held-out
ELBO of every earlier epoch.  Computing it from the run's history, rather than keeping a torch
scheduler's state, is what makes ``--resume`` exact for free: the history is in ``metrics.jsonl``.
The multipliers are those of torch's schedulers, epoch by epoch
(``tests/training/test_training_controls.py``):

* ``cosine``: ``CosineAnnealingLR(T_max=epochs)``, from lr down towards 0 at the last epoch;
* ``step``: ``StepLR(step_size, gamma=factor)``;
* ``plateau``: ``ReduceLROnPlateau(mode="max", factor, patience, threshold=0,
  threshold_mode="abs")`` on the watched ELBO (any rise counts as progress).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

LR_SCHEDULES = ("constant", "cosine", "step", "plateau")


@dataclass(frozen=True)
class LearningRateSchedule:
    kind: str = "constant"
    epochs: int = 1
    factor: float = 0.1
    step_epochs: int = 1
    patience: int = 10

    def multiplier(self, epoch: int, watched: Sequence[float] = ()) -> float:
        """The multiplier of epoch ``epoch`` (1-based); ``watched``: the values of the epochs
        before it (``plateau`` only)."""
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / self.epochs))
        if self.kind == "step":
            return self.factor ** ((epoch - 1) // self.step_epochs)
        if self.kind == "plateau":
            multiplier, best, bad = 1.0, -math.inf, 0
            for value in watched:
                if value > best:
                    best, bad = value, 0
                else:
                    bad += 1
                if bad > self.patience:
                    multiplier, bad = multiplier * self.factor, 0
            return multiplier
        return 1.0


def epochs_since_best(watched: Sequence[float]) -> int:
    """Epochs after the best (highest) value; 0 when the last is the best.  NaN never counts
    as best."""
    best_at, best = -1, -math.inf
    for i, value in enumerate(watched):
        if value > best:
            best_at, best = i, value
    return len(watched) - 1 - best_at if best_at >= 0 else len(watched)
