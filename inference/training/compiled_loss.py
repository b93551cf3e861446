"""A minibatch loss with Pyro's per-step Python overhead traced away, verified against eager.

Running a Pyro pair costs far more Python than the tensors need: every ``pyro.module``,
``pyro.param`` and ``pyro.sample`` goes through the handler stack, every site builds
distribution objects, and ``Trace_ELBO`` walks both traces.  On the 784-400-50 VAE that is
~2.4 ms of a 4 ms step at batch 32 (``benchmarks/benchmark.py``).  ``torch.jit.trace`` records
the tensor operations of one call, and later calls replay them without any of that Python;
the sampling ops are recorded as ops, so every replay draws fresh noise.

Recording is only correct for a pair whose operations do not depend on the values of the data
or on Python-side state, so a recording is trusted only after two checks:

* the pair's own code raised no ``TracerWarning`` (the tracer warns when a tensor value steers
  Python: a branch on ``x.sum() > 0``, an ``.item()``, a Python number taken from a tensor);
* on the minibatch it was recorded on and on the next one of the same shape, the recording's
  loss *and gradient* equal the eager ones for the same random draws.  (The gradient check is
  not idle: Pyro 1.9's ``JitTrace_ELBO.differentiable_loss`` doubles reparameterized gradients.)

The same check runs again at the start of every epoch (``recheck``).  What no check can see is
Python state that changes from one step to the next inside an epoch: a weight that changes per
step must be an input of the loss, a tensor argument, as ``fit``'s KL weight is
(``elbogap.training.kl_weight``); a pair that anneals Python state of its own must train with
``jit`` off.

Anything else (a warning, a mismatch, a tracer error, a torch without ``torch.jit.trace``)
makes this object fall back to the eager loss for good, with ``reason`` saying why.  A recording
is keyed on the inputs' shapes and dtypes and on ``key`` (the data-plate scale, which the
recording holds as a constant), so the short last minibatch of an epoch gets its own.

Recordings run with the graph executor's optimizations off: the ops are replayed as recorded
and differentiated by the same autograd formulas as the eager loss, so a step is the eager
step to rounding; the JIT's own derivatives (softplus's, for one) were no faster here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from pathlib import Path

import pyro
import torch

from ..foundations.rng import rng_preserved
from ..foundations.traces import first_line

# The recording runs the eager loss's operations; only the summation order of its value
# (float32 tensors against Pyro's float64 Python sum) may differ, by about 1e-7.
RELATIVE_TOLERANCE = 1e-5
CHECKS_PER_KEY = 2  # the recording minibatch and the next one


class CompiledLoss:
    """``loss(*inputs, key=key) -> scalar tensor``: ``eager(*inputs)``, or where that is safe a
    recording of it.  ``inputs`` are tensors: the minibatch, and any per-step weight.

    ``record()`` returns a fresh recording function (a new ``pyro.infer.JitTrace_ELBO``'s loss,
    say) whose first call records; one is made per key.  ``eager`` and the recordings must read
    their parameters from Pyro's param store, so that optimizer updates reach every replay.
    """

    def __init__(
        self,
        eager: Callable[..., torch.Tensor],
        record: Callable[[], Callable[..., torch.Tensor]],
    ):
        self.eager = eager
        self.record = record
        self.reason: str | None = None  # why recordings are off, once they are
        self._recordings: dict[Hashable, Callable] = {}
        self._checks: dict[Hashable, int] = {}
        self._param_names: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.reason is None

    def disable(self, reason: str) -> None:
        self.reason = reason
        self._recordings.clear()

    def recheck(self) -> None:
        """Check each recording once more on its next call.  ``fit`` does this every epoch, so
        Python state a pair changes between epochs (a KL weight, say) ends the recordings at
        the first step that would have used a stale one."""
        self._checks = {key: min(n, CHECKS_PER_KEY - 1) for key, n in self._checks.items()}

    def __call__(self, *inputs: torch.Tensor, key: Hashable = None) -> torch.Tensor:
        if not self.enabled:
            return self.eager(*inputs)
        key = (tuple((tuple(x.shape), x.dtype) for x in inputs), key)
        names = tuple(pyro.get_param_store().keys())
        if names != self._param_names:
            # A parameter created since the recordings were made is not one of their inputs.
            self._recordings.clear()
            self._checks.clear()
            self._param_names = names
        if key not in self._recordings and not self._record(inputs, key):
            return self.eager(*inputs)
        if self._checks.get(key, 0) < CHECKS_PER_KEY:
            return self._checked(inputs, key)
        return self._replay(key, inputs)

    def _replay(self, key: Hashable, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with torch.jit.optimized_execution(False):
            return self._recordings[key](*inputs)

    def _record(self, inputs: tuple[torch.Tensor, ...], key: Hashable) -> bool:
        recording = self.record()
        with rng_preserved(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with torch.jit.optimized_execution(False):
                    recording(*inputs)
            except Exception as e:  # noqa: BLE001 - any tracer failure means: stay eager
                self.disable(f"the pair could not be recorded: {first_line(e)}")
                return False
        pair_warnings = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)
                         and not _in_library(w.filename)]
        if pair_warnings:
            w = pair_warnings[0]
            # torch's wording runs to four sentences; the first says what happened.
            said = first_line(w.message).split(". ")[0]
            self.disable(f"{w.filename}:{w.lineno} makes Python depend on a tensor's value ({said})")
            return False
        self._recordings[key] = recording
        return True

    def _checked(self, inputs: tuple[torch.Tensor, ...], key: Hashable) -> torch.Tensor:
        """The recording's loss for this minibatch, once its loss and gradient are found equal
        to the eager ones for the same random draws; else the eager loss, from now on."""
        named = [(n, p) for n, p in pyro.get_param_store().named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        with rng_preserved():
            loss = self._replay(key, inputs)
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        # The eager loss last, so that the random streams move as in any one step.
        expected = self.eager(*inputs)
        expected_grads = torch.autograd.grad(expected, params, retain_graph=True,
                                             allow_unused=True)
        mismatch = _first_mismatch(loss, expected, grads, expected_grads, [n for n, _ in named])
        if mismatch is not None:
            self.disable(f"the recording's {mismatch} differs from the eager one: the pair "
                         "depends on something a recording holds fixed")
            return expected
        self._checks[key] = self._checks.get(key, 0) + 1
        return loss


def _first_mismatch(loss, expected, grads, expected_grads, names) -> str | None:
    # NaN on both sides is agreement: a bad minibatch is the step's business, not the recording's.
    if not torch.allclose(loss.detach(), expected.detach(), rtol=RELATIVE_TOLERANCE,
                          equal_nan=True):
        return f"loss {loss.item():.7g} (eager {expected.item():.7g})"
    for name, g, e in zip(names, grads, expected_grads, strict=True):
        if (g is None) != (e is None):
            return f"gradient of {name}"
        if g is not None:
            atol = RELATIVE_TOLERANCE * float(e.abs().nan_to_num().max()) + 1e-12
            if not torch.allclose(g, e, rtol=RELATIVE_TOLERANCE, atol=atol, equal_nan=True):
                return f"gradient of {name}"
    return None


def _in_library(filename: str) -> bool:
    """Warnings raised inside torch or Pyro come from their shape checks and bookkeeping (the
    shapes are part of a recording's key, the values are checked); the pair's own code must
    not raise any."""
    return filename.startswith(_LIBRARY_ROOTS)


_LIBRARY_ROOTS = tuple(str(Path(m.__file__).resolve().parent) for m in (torch, pyro))
