"""The KL term of the ELBO weighted: β (Higgins et al. 2017) and KL warm-up (Bowman et al. 2016).

    L_w(x) = E_q[log p(x | z)] − w · KL(q(z | x) ‖ p(z)),

with w = β · min(1, t / warm-up), t the training time in epochs.  The weight multiplies the scale
of every *latent* sample site, in the model and the guide alike, and never an observed one: with
``Trace_ELBO`` that weights the latent sites' log-ratio log p(z) − log q(z), with
``TraceMeanField_ELBO`` its analytic KL (which takes the guide site's scale).  This is how Pyro's
own examples anneal (``examples/dmm.py`` scales its latent sites with ``poutine.scale``); here a
user's pair needs no change.

The weight is a tensor *argument* of the weighted pair, not Python state: a recording of the loss
(``elbogap.training.compiled_loss``) then takes it as an input and replays correctly while it
changes from step to step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample


class _ScaleLatents(Messenger):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def _process_message(self, msg: dict) -> None:
        if msg["type"] != "sample" or msg["is_observed"] or site_is_subsample(msg):
            return
        msg["scale"] = msg["scale"] * self.weight


class KLWeighted:
    """``KLWeighted(fn)(*inputs, weight)`` runs ``fn(*inputs)`` with every latent site's
    log-density scaled by ``weight``; wrap the model and the guide both."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *inputs: Any):
        *inputs, weight = inputs
        with _ScaleLatents(weight):
            return self.fn(*inputs)


@dataclass(frozen=True)
class KLSchedule:
    """w(epoch, step) = beta · min(1, progress / warmup_epochs), progress counted in epochs from
    0 at the first step of training (so a warm-up starts with the reconstruction alone)."""

    beta: float = 1.0
    warmup_epochs: int = 0

    @property
    def active(self) -> bool:
        """Whether any step weights the KL (else the pair is trained on the plain ELBO)."""
        return self.beta != 1.0 or self.warmup_epochs > 0

    def weight(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        """The weight of step ``step`` (1-based) of epoch ``epoch`` (1-based)."""
        if self.warmup_epochs <= 0:
            return self.beta
        progress = (epoch - 1) + (step - 1) / max(1, steps_per_epoch)
        return self.beta * min(1.0, progress / self.warmup_epochs)

    def is_elbo(self, epoch: int) -> bool:
        """Whether every step of ``epoch`` trains the true ELBO (weight 1 throughout)."""
        return self.beta == 1.0 and (self.warmup_epochs <= 0 or epoch - 1 >= self.warmup_epochs)

