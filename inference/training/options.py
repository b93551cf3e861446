"""The settings of ``fit``, checked before any training.

Each field is also a flag of ``scripts/fit.py`` (``epochs`` is ``--epochs``); a bad value is
named by its field here (``OptionError``) and by its flag on the command line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..foundations.errors import OptionError, check_positive
from ..foundations.wording import counted
from .elbo_step import ELBOS
from .kl_weight import KLSchedule
from .schedule import LR_SCHEDULES


@dataclass
class FitOptions:
    """Settings of ``fit``."""

    epochs: int = 200
    batch_size: int = 100
    lr: float = 1e-3
    num_particles: int = 1
    elbo: str = "trace"
    renyi_alpha: float = 0.0  # elbo="iwae": 0 is IWAE; the Renyi bound of order alpha otherwise
    eval_every: int | None = None  # None: as often as keeps diagnostics ~10 % of training time
    eval_samples: int = 100
    eval_points: int = 500
    data_plate: str | None = None  # None: found (elbogap.foundations.data_plate)
    progress: bool = True
    time_budget: float | None = None  # seconds; training stops after the epoch that exceeds it
    seed: int = 0  # fixes the data order and dynamic binarization of every epoch
    max_nonfinite_steps: int = 10  # consecutive skipped steps before training stops
    jit: bool = True  # replay a checked recording of the loss (elbogap.training.compiled_loss)
    device: str = "cpu"  # auto, cpu, cuda or cuda:INDEX (elbogap.foundations.device)
    beta: float = 1.0  # weight of the KL term (elbogap.training.kl_weight)
    kl_warmup: int = 0  # epochs over which that weight rises linearly from 0 to beta
    lr_schedule: str = "constant"  # constant, cosine, step or plateau (elbogap.training.schedule)
    lr_factor: float = 0.1  # step and plateau: the learning rate's multiplier at each decay
    lr_step_epochs: int = 50  # step: epochs between decays
    lr_patience: int = 10  # plateau: epochs without a rise of the watched ELBO before a decay
    clip_norm: float | None = None  # clip the gradients' global norm to this
    patience: int | None = None  # stop after this many epochs without a better validation ELBO

    def __post_init__(self) -> None:
        # Refused where they are written, not at fit() after the data are read.
        self.check_values()

    def check(self, num_train: int, world_size: int = 1) -> None:
        """Refuse settings that cannot work for ``num_train`` training points shared by
        ``world_size`` processes."""
        self.check_values()
        if self.batch_size * world_size > num_train:
            per = f" x {world_size} processes" if world_size > 1 else ""
            raise OptionError("batch_size", f"{{option}} {self.batch_size}{per} is larger than "
                              f"the training set ({counted(num_train, 'point')})")

    def check_values(self) -> None:
        """Refuse values no data set could make work (epochs 0, a negative learning rate)."""
        for name in ("epochs", "batch_size", "num_particles", "eval_every", "eval_samples",
                     "eval_points", "max_nonfinite_steps"):
            value = getattr(self, name)
            if name == "eval_every" and value is None:
                continue
            if value is None:
                raise OptionError(name, "must be a positive integer, got None")
            check_positive(**{name: value})
        if not (isinstance(self.lr, float | int) and math.isfinite(self.lr) and self.lr > 0):
            raise OptionError("lr", f"must be a positive number, got {self.lr}")
        if self.time_budget is not None and not (isinstance(self.time_budget, float | int)
                                                 and 0 < self.time_budget < math.inf):
            raise OptionError("time_budget", f"must be a positive number of seconds, got "
                                             f"{self.time_budget}")
        if self.data_plate is not None and (not isinstance(self.data_plate, str)
                                            or not self.data_plate):
            raise OptionError("data_plate", f"must be a plate's name, got {self.data_plate!r}")
        if self.elbo not in ELBOS:
            raise OptionError("elbo", f"must be one of {sorted(ELBOS)}, got {self.elbo!r}")
        if not (0 <= self.renyi_alpha < math.inf and self.renyi_alpha != 1):
            raise OptionError("renyi_alpha", "must be >= 0 and not 1 (alpha = 1 is the ELBO "
                              f"itself), got {self.renyi_alpha}")
        for name in ("beta", "clip_norm"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, float | int) and math.isfinite(value)
                                          and value > 0):
                raise OptionError(name, f"must be a positive number, got {value}")
        for name, least in (("kl_warmup", 0), ("lr_step_epochs", 1), ("lr_patience", 0),
                            ("patience", 1)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < least):
                raise OptionError(name, f"must be an integer >= {least}, got {value}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise OptionError("lr_schedule", f"must be one of {list(LR_SCHEDULES)}, "
                              f"got {self.lr_schedule!r}")
        if not (isinstance(self.lr_factor, float | int) and 0 < self.lr_factor < 1):
            raise OptionError("lr_factor", f"must be between 0 and 1, got {self.lr_factor}")
        if self.elbo == "iwae" and self.kl_schedule.active:
            raise OptionError("elbo", "{option} iwae trains a bound with no separate KL term, "
                              "which beta and kl_warmup would weight: train it at beta 1 without "
                              "a warm-up")

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
