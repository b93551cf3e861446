"""Subsampled plates widened to their full size: the program the diagnostics evaluate.

Pyro's minibatch idiom — ``pyro.plate(name, N, subsample_size=m)`` as a context or iterated
(``for i in pyro.plate(...)``), with ``pyro.subsample(x, event_dim)`` inside — makes each run of
a program score a random m of its N members, scaled by N / m: an unbiased estimate of the whole
objective for SVI, but not the density of the data at any one draw.  Importance weights,
annealing and simulation need that density, so every diagnostic pass runs the program with each
such plate at its full size: indices 0..N-1, scale 1, ``pyro.subsample`` returning its argument
whole.  Fitting keeps the program's own subsampling.

Pyro decides a plate's indices in ``SubsampleMessenger._subsample`` (its subsample size is an
argument there, checked against the indices a handler would supply), so the widening is a
wrapper of that one function, active only inside ``full_plates``; elsewhere it calls Pyro's own.

A plate declared over the whole data set and handed minibatches from outside
(``pyro.plate("data", N, len(x_batch))``: its indices index nothing) is kept as it is
(``kept``): the data it scores are the ones it is given.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from pyro.poutine.subsample_messenger import SubsampleMessenger


@dataclass
class Widening:
    """The plates to leave as they are, and those widened so far: name -> (N, m)."""

    kept: frozenset[str] = frozenset()
    widened: dict[str, tuple[int, int]] = field(default_factory=dict)


_active = threading.local()
_pyro_subsample = SubsampleMessenger.__dict__["_subsample"].__func__


def _subsample(name: str, size=None, subsample_size=None, subsample=None, use_cuda=None,
               device=None):
    widening = getattr(_active, "widening", None)
    if widening is not None and name not in widening.kept and isinstance(size, int):
        picked = subsample_size if subsample is None else len(subsample)
        if picked is not None and picked < size:
            widening.widened[name] = (size, int(picked))
            subsample_size, subsample = None, None
    return _pyro_subsample(name, size, subsample_size, subsample, use_cuda, device)


def _install() -> None:
    if SubsampleMessenger.__dict__["_subsample"].__func__ is not _subsample:
        SubsampleMessenger._subsample = staticmethod(_subsample)


@contextmanager
def full_plates(kept: frozenset[str] = frozenset()) -> Iterator[Widening]:
    """Inside, every subsampling plate not named in ``kept`` takes all of its indices."""
    _install()
    outer = getattr(_active, "widening", None)
    widening = Widening(kept if outer is None else outer.kept | kept)
    _active.widening = widening
    try:
        yield widening
    finally:
        _active.widening = outer
        if outer is not None:
            outer.widened.update(widening.widened)


def widened(program: Callable, kept: frozenset[str] = frozenset()) -> Callable:
    """``program`` (bound to its ``ProgramData``) run with its subsampling plates widened."""
    def run(*args: Any, **kwargs: Any):
        with full_plates(kept):
            return program(*args, **kwargs)

    run.program = getattr(program, "program", program)
    run.widens = True
    return run


def observations_cut(model_trace, widened_plates: dict[str, tuple[int, int]]) -> str | None:
    """Where a widened plate's observed site holds fewer than N values along the plate's
    dimension (its data picked by other means than the plate's indices), the reason; else None."""
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        value = site["value"]
        if not torch.is_tensor(value):
            continue
        for frame in site["cond_indep_stack"]:
            if frame.name not in widened_plates or not frame.vectorized:
                continue
            position = value.dim() - site["fn"].event_dim + frame.dim
            extent = value.shape[position] if 0 <= position < value.dim() else 1
            if extent != frame.size:
                full, picked = widened_plates[frame.name]
                return (f"observed site '{name}' holds {extent} value(s) along plate "
                        f"'{frame.name}' at its full size {full} (it subsamples {picked}): its "
                        "data are not picked by the plate's indices (index them, x[ind], or "
                        "use pyro.subsample)")
    return None


def widened_note(plates: tuple[tuple[str, int, int], ...]) -> str:
    """What the numbers of a pair with widened plates are of."""
    said = ", ".join(f"'{name}' subsamples {m} of {n}" for name, n, m in plates)
    return (f"plate(s) {said} in the program: every number here is of the full plate(s), all "
            "members scored unscaled (a random subsample is no one data set's density); "
            "fitting keeps the program's own subsampling")
