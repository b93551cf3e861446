"""Adam on a loss closure, with a step size that decays tenfold over the run."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


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
