"""Minibatch scaling of the data plate, so that Trace_ELBO estimates the full-data ELBO."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from pyro.util import ignore_jit_warnings

from ..foundations.traces import data_frame


class ScaleDataPlate(Messenger):
    """Scale every site inside plate ``data_plate`` by ``full_size / batch size``.

    This is exactly the scale that ``pyro.plate(..., subsample_size=B)`` applies; doing it here
    lets a model write ``pyro.plate("data", x.shape[0])`` and be handed minibatches of x.
    Sites outside the plate (global latents, priors on parameters) are left unscaled.  A plate
    that subsamples itself keeps Pyro's own N / B scale (times ``full_size / N`` if it
    declares another size than the data set's).
    """

    def __init__(self, data_plate: str, full_size: int):
        super().__init__()
        self.data_plate = data_plate
        self.full_size = full_size
        # Data-parallel training sets this to (global batch) / (number of ranks), so that the
        # ranks' average gradient is that of the global batch even when shards differ in size.
        self.batch_size: float | None = None
        # Rows of the current minibatch: the size of a plate written without one.
        self.rows: int | None = None
        self._declared: int | None = None

    def _process_message(self, msg: dict) -> None:
        if msg["type"] != "sample":
            return
        if msg["name"] == self.data_plate and site_is_subsample(msg):
            # The plate's entry.  A plate that subsamples (pyro.plate(name, N, B)) already
            # scales its sites by N / B; only a declared N other than the data set's is
            # corrected.  Every call of the pair enters the plate anew, so this is current.
            fn = msg["fn"]
            declared, picked = _as_int(fn.size), fn.subsample_size
            picked = None if picked is None else _as_int(picked)
            self._declared = declared if picked not in (None, declared) else None
            return
        frame = data_frame(msg, self.data_plate)
        if frame is None:
            return
        if self._declared is not None:
            msg["scale"] = msg["scale"] * (self.full_size / self._declared)
            return
        size = _as_int(frame.size)
        if size == -1:
            size = self.rows
        if size:
            msg["scale"] = msg["scale"] * (self.full_size / (self.batch_size or size))


def _as_int(size) -> int:
    if torch.is_tensor(size):
        # Under torch.jit.trace a plate's size is a traced shape.  Recordings are keyed on the
        # minibatch's shape (elbogap.training.compiled_loss), so holding it fixed is exact.
        with ignore_jit_warnings():
            return int(size)
    return size


def scale_data_plate(fn: Callable, data_plate: str, full_size: int) -> Callable:
    """``fn`` with its data plate scaled to a data set of ``full_size`` points."""
    return ScaleDataPlate(data_plate, full_size)(fn)
