"""A pass of particles recorded once per chunk shape and compiled, checked against the eager pass.

``evaluate`` spends most of a long run in the same pass over and over: the guide and model traced
on a chunk of points in a plate of k particles, then the terms read off the traces.  Eager
PyTorch runs every element-wise step of it (the decoder's activations, the Bernoulli
log-density's softplus, the sums) as a pass of its own over memory, and Pyro adds its Python per
site.  Here the pass is recorded with ``make_fx`` (the tensor operations alone, none of Pyro's
Python) and compiled by inductor, which fuses those steps into loops over the matmuls' outputs.

Trusted only after checks, each a reason to evaluate eagerly for good (``reason`` says which):

* recorded on fake tensors: an operation whose result steers Python (``.item()``, a branch on a
  value) cannot be recorded and fails the recording instead of being baked into it;
* on the first chunks of a shape (``CHECKS_PER_SHAPE``), the compiled terms equal the eager
  terms of the same draws (random operations run as torch's own, in the same order) to
  ``RELATIVE_TOLERANCE``; the eager terms are the ones used for those chunks.

Recordings are kept across calls for the same model and guide (a few, most recent first): they
read the pair's parameters where they are, so a later call sees its current values.  A kept
recording is checked again on the first chunk of every call; one that no longer agrees (its
parameters replaced by new tensors, say) is recorded afresh.

Pairs whose pass differs from batch to batch in a way the shapes do not show (a plate picking
its own minibatch, whose indices would be baked in) are not recorded.
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import fields

import torch

from ..foundations.pair_layout import PairLayout
from ..foundations.program_data import ProgramData
from ..foundations.rng import rng_state, set_rng_state
from ..foundations.traces import first_line
from .passes import particles_of
from .terms import KLTerm, ParticleTerms

# float32 log-densities summed over hundreds of pixels: eager and fused loops add them in other
# orders, about 2e-7 apart relative (measured on the 784-400-50 VAE); 1e-5 leaves room.
RELATIVE_TOLERANCE = 1e-5
CHECKS_PER_SHAPE = 2
# Compile where the eager pass would take longer than this.  Compiling the 784-400-50 VAE's pass
# took 24 s on these 2 cores with an empty inductor cache (2 s with it filled), and the compiled
# pass is 1.6-1.8x faster: at 60 s of eager work it saves about what a cold compile costs.
COMPILE_AFTER_SECONDS = 60.0

_KEPT = 8  # recordings kept across calls
_kept: OrderedDict[tuple, tuple] = OrderedDict()

# (A pass with discrete guide sites summed over is never compiled: its elbo_log_weight is set.)
_TENSOR_FIELDS = [f.name for f in fields(ParticleTerms)
                  if f.name not in ("kl", "latent_mean", "elbo_log_weight")]


def _flat(terms: ParticleTerms) -> tuple[tuple[torch.Tensor, ...], tuple]:
    tensors = [getattr(terms, name) for name in _TENSOR_FIELDS]
    tensors += [term.value for term in terms.kl.values()] + list(terms.latent_mean.values())
    spec = (tuple((name, term.method) for name, term in terms.kl.items()),
            tuple(terms.latent_mean))
    return tuple(tensors), spec


def _terms(tensors, spec) -> ParticleTerms:
    kl_spec, means = spec
    n = len(_TENSOR_FIELDS)
    kl = {name: KLTerm(tensors[n + i], method) for i, (name, method) in enumerate(kl_spec)}
    latent = dict(zip(means, tensors[n + len(kl_spec):], strict=True))
    return ParticleTerms(**dict(zip(_TENSOR_FIELDS, tensors[:n], strict=True)), kl=kl,
                         latent_mean=latent)


class CompiledPass:
    """``particles(model, guide, x, layout, k)``: the terms of k particles on the batch ``x``,
    from a compiled recording of the pass where one is trusted, else eagerly.

    ``enabled``: True compiles every shape it can, False never, None (automatic) compiles a
    shape once the eager pass of the chunks expected of it (``expect``) would exceed
    ``COMPILE_AFTER_SECONDS``."""

    def __init__(self, data_plate: str, enabled: bool | None = None):
        self.data_plate = data_plate
        self.enabled = enabled
        self.reason: str | None = None if enabled is not False else "off (compiled=False)"
        self.recordings: dict[tuple, tuple] = {}  # key -> (compiled, spec, recorded here)
        self.checks: dict[tuple, int] = {}
        self.expected: dict[tuple, int] = {}
        self.used = 0  # chunks computed by a checked recording

    def expect(self, x: ProgramData, k: int, chunks: int) -> None:
        """``chunks`` more chunks of ``k`` particles on batches shaped as ``x`` are coming."""
        key = self._key(x, k)
        self.expected[key] = self.expected.get(key, 0) + chunks

    @staticmethod
    def _key(x: ProgramData, k: int) -> tuple:
        return (k,) + tuple((tuple(t.shape), t.dtype, t.device) for t in x.flat())

    def _kept_key(self, model: Callable, guide: Callable, key: tuple) -> tuple | None:
        """The key of a recording kept across calls: the user's programs (None where they
        are not known, as for a pair wrapped afresh on every call)."""
        programs = (getattr(model, "program", None), getattr(guide, "program", None))
        if None in programs:
            return None
        try:
            hash(programs)
        except TypeError:
            return None
        return (*programs, self.data_plate, key)

    def particles(self, model: Callable, guide: Callable, x: ProgramData, layout: PairLayout,
                  k: int) -> ParticleTerms:
        key = self._key(x, k)
        if self.reason is not None or layout.subsample is not None or not layout.vectorized \
                or k < 2:
            return self._eager(model, guide, x, layout, k)
        recording = self.recordings.get(key)
        kept_key = self._kept_key(model, guide, key)
        if recording is None and kept_key in _kept:
            _kept.move_to_end(kept_key)
            recording = self.recordings[key] = (*_kept[kept_key], False)
        if recording is None:
            started = time.perf_counter()
            terms = self._eager(model, guide, x, layout, k)
            worth = self.enabled or (
                (time.perf_counter() - started) * self.expected.get(key, 1)
                > COMPILE_AFTER_SECONDS)
            if worth:
                self._record(key, kept_key, model, guide, x, layout, k)
            return terms
        if self.checks.get(key, 0) < (CHECKS_PER_SHAPE if recording[2] else 1):
            return self._checked(key, kept_key, recording, model, guide, x, layout, k)
        self.used += 1
        compiled, spec, _ = recording
        return _terms(compiled(*x.flat()), spec)

    def _eager(self, model, guide, x, layout, k) -> ParticleTerms:
        return particles_of(model, guide, x, layout, k, self.data_plate)[0]

    def _record(self, key, kept_key, model, guide, x: ProgramData, layout: PairLayout,
                k: int) -> None:
        from torch.fx.experimental.proxy_tensor import make_fx

        spec: list = []

        def flat_pass(*tensors):
            flat, s = _flat(self._eager(model, guide, x.with_flat(tensors), layout, k))
            spec.append(s)
            return flat

        saved = rng_state()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = make_fx(flat_pass, tracing_mode="fake",
                                _allow_non_fake_inputs=True)(*x.flat())
            compiled = torch.compile(graph, options={"fallback_random": True})
        except Exception as e:  # noqa: BLE001 - any failure to record means: stay eager
            self.reason = f"the pass could not be recorded ({type(e).__name__}: {first_line(e)})"
            return
        finally:
            set_rng_state(saved)
        self.recordings[key] = (compiled, spec[0], True)
        if kept_key is not None:
            _kept[kept_key] = (compiled, spec[0])
            while len(_kept) > _KEPT:
                _kept.popitem(last=False)

    def _checked(self, key, kept_key, recording, model, guide, x, layout,
                 k) -> ParticleTerms:
        """The eager terms of this chunk, after comparing the recording's on the same draws."""
        compiled, spec, fresh = recording
        saved = rng_state()
        eager = self._eager(model, guide, x, layout, k)
        after = rng_state()
        set_rng_state(saved)
        try:
            with torch.no_grad():
                replayed = _terms(compiled(*x.flat()), spec)
        except Exception as e:  # noqa: BLE001 - a compiler failure: stay eager
            self.reason = f"the compiled pass failed ({type(e).__name__}: {first_line(e)})"
            set_rng_state(after)
            return eager
        set_rng_state(after)
        mismatch = _mismatch(eager, replayed)
        if mismatch is not None and not fresh:
            # A recording of an earlier call: recorded afresh on the next chunk.
            del self.recordings[key]
            _kept.pop(kept_key, None)
        elif mismatch is not None:
            self.reason = f"the compiled pass disagreed with the eager one ({mismatch})"
        else:
            self.checks[key] = self.checks.get(key, 0) + 1
        return eager

    def note(self) -> str | None:
        """What the numbers owe to a compiled pass, or why there was none where asked for."""
        if self.used:
            return (f"{self.used} chunk(s) of particles were computed by a compiled pass "
                    "(torch.compile), checked against the eager pass on the first chunks of "
                    f"each shape to a relative {RELATIVE_TOLERANCE:g}")
        if self.enabled and self.reason is not None:
            return f"no compiled pass: {self.reason}; evaluated eagerly"
        return None


def _mismatch(eager: ParticleTerms, replayed: ParticleTerms) -> str | None:
    a, spec_a = _flat(eager)
    b, spec_b = _flat(replayed)
    if spec_a != spec_b:
        return "other sites"
    names = (_TENSOR_FIELDS + [f"KL of '{name}'" for name, _ in spec_a[0]]
             + [f"E_q['{name}']" for name in spec_a[1]])
    for name, u, v in zip(names, a, b, strict=True):
        if u.shape != v.shape:
            return f"{name}: shape {tuple(v.shape)} against {tuple(u.shape)}"
        if not torch.allclose(u, v.to(u.dtype), rtol=RELATIVE_TOLERANCE, atol=1e-5,
                              equal_nan=True):
            return f"{name}: largest difference {(u - v).abs().max().item():.3g}"
    return None
