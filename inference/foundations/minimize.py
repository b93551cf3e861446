"""Adam on a loss closure, with a step size that decays tenfold over the run; and parameters
put back after a fit that was only to be looked at."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch


@contextlib.contextmanager
def restored(parameters: list[torch.Tensor]) -> Iterator[None]:
    """Run a block that changes ``parameters`` in place (a refit, a fine-tuning), then put
    their values back, whatever happened in it."""
    saved = [t.detach().clone() for t in parameters]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, value in zip(parameters, saved, strict=True):
                t.copy_(value)


def minimize(
    loss_fn: Callable[[], torch.Tensor], parameters: Iterable[torch.Tensor], *, steps: int,
    lr: float,
) -> list[float]:
    """Minimize ``loss_fn()`` over ``parameters``; return the loss of every step.

    The decaying step lets the last iterates settle at a stochastic optimum instead of jittering
    around it.  Gradients are taken for ``parameters`` alone (``torch.autograd.grad``), so any
    other tensor the loss depends on, a trained model's weights say, keeps its ``.grad``.
    """
    parameters = list(parameters)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.1 ** (1 / steps))
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        for p, g in zip(parameters, torch.autograd.grad(loss, parameters), strict=True):
            p.grad = g
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses
