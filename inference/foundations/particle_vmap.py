"""Particles of a pair that does not broadcast over a leading particle dimension, vectorized
with ``torch.func.vmap``: the program runs once, on one particle's tensors, and vmap batches
every operation over the particles.  ``nn.Linear`` on a sampled weight, ``locs[assignment]``,
Python loops over a plate's indices: what breaks in Pyro's particle plate works under vmap,
since the program never sees the particle dimension.

Two ways, tried in this order:

* **draws inside vmap** (``randomness="different"``): guide and model run together, each
  particle drawing its own z;
* **draws in a loop, replayed under vmap**: the guide is traced particle by particle (a
  sampler vmap has no rule for), and everything after the draws is vmapped.

Whatever vmap cannot take (``.item()``, data-dependent Python control flow, in-place updates
of an input) raises, and the caller falls back to the loop with that reason.  Nothing here
decides whether a vmapped pass is right: callers compare it with the plain loop on the same
draws before they use it.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributions.utils as distribution_utils
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch.distributions import Dirichlet, Gamma
from torch.func import vmap

from .traces import first_line, user_frame

DRAWS_INSIDE = "draws inside vmap"
DRAWS_IN_A_LOOP = "draws in a loop, replayed under vmap"


@contextlib.contextmanager
def batched_randomness() -> Iterator[None]:
    """Samplers vmap cannot batch, replaced by ones of the same distribution that it can:
    torch's normal draws (``torch.empty(shape).normal_()``, in place on an unbatched tensor) by
    ``torch.randn`` of the same shape, and Dirichlet's (an autograd Function without
    ``setup_context``) by normalized Gamma draws, reparameterized as torch's Gamma is."""
    original = distribution_utils._standard_normal
    modules = _modules_with(original)
    for module in modules:
        module._standard_normal = _randn
    dirichlet_rsample = Dirichlet.rsample
    Dirichlet.rsample = _dirichlet_rsample
    try:
        with warnings.catch_warnings():
            # Ops without a batching rule run in a loop inside vmap: slower, never wrong.
            warnings.filterwarnings("ignore", message="There is a performance drop")
            yield
    finally:
        Dirichlet.rsample = dirichlet_rsample
        for module in modules:
            module._standard_normal = original


def _randn(shape, dtype, device) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device)


def _dirichlet_rsample(self, sample_shape=()) -> torch.Tensor:
    shape = self._extended_shape(sample_shape)
    gammas = Gamma(self.concentration.expand(shape), 1.0).rsample()
    return (gammas / gammas.sum(-1, keepdim=True)).clamp(min=torch.finfo(gammas.dtype).tiny)


_found: dict = {}


def _modules_with(original) -> list:
    """The modules of torch's and Pyro's distributions that hold ``_standard_normal`` (found
    again only when modules were imported since)."""
    if _found.get("count") != len(sys.modules):
        _found["modules"] = [m for name, m in list(sys.modules.items())
                             if name.startswith(("torch.distributions", "pyro"))
                             and getattr(m, "_standard_normal", None) is original]
        _found["count"] = len(sys.modules)
    return _found["modules"]


@dataclass
class StackedDraws:
    """The latent draws of k particles, site by site, stacked on a leading dimension
    (``[k, *site value shape]``), with the ``infer`` dict each site was drawn with."""

    values: dict[str, torch.Tensor]
    infer: dict[str, dict]

    def __len__(self) -> int:
        return next(iter(self.values.values())).shape[0] if self.values else 0

    def particle(self, j: int) -> Trace:
        """Particle ``j`` as a trace to replay a program on."""
        return as_trace({name: v[j] for name, v in self.values.items()}, self.infer)

    def only(self, names) -> StackedDraws:
        return StackedDraws({n: v for n, v in self.values.items() if n in names},
                            {n: i for n, i in self.infer.items() if n in names})

    @classmethod
    def of_traces(cls, traces: list[Trace]) -> StackedDraws:
        """The latent draws of per-particle traces, stacked."""
        sites = latent_draws(traces[0])
        return cls({name: torch.stack([t.nodes[name]["value"] for t in traces])
                    for name in sites},
                   {name: traces[0].nodes[name]["infer"] for name in sites})


def latent_draws(trace: Trace) -> dict[str, torch.Tensor]:
    """The values a trace drew (its sample sites, neither observed nor subsample indices)."""
    return {name: site["value"] for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
            and not site_is_subsample(site)}


def as_trace(values: dict[str, torch.Tensor], infer: dict[str, dict]) -> Trace:
    """A trace that ``poutine.replay`` takes ``values`` from."""
    trace = Trace()
    for name, value in values.items():
        trace.add_node(name, type="sample", name=name, value=value, is_observed=False,
                       infer=dict(infer.get(name, {})), fn=None, cond_indep_stack=(), mask=None,
                       scale=1.0, args=(), kwargs={})
    return trace


def vmapped(fn: Callable, k: int, given: dict[str, torch.Tensor] | None,
            randomness: str) -> object:
    """``fn(one particle's given values)`` for k particles under vmap; ``given`` values are
    stacked on dimension 0 (None: ``fn`` gets an empty dict and draws its own)."""
    given = given or {}
    particles = torch.zeros(k)  # vmap needs one batched input even where nothing is given

    def one(_, values):
        return fn(values)

    if randomness != "different":
        return vmap(one, randomness=randomness)(particles, given)
    with batched_randomness():
        return vmap(one, randomness=randomness)(particles, given)


def vmapped_pair(fn: Callable[[Trace | None], tuple[object, Trace]], k: int,
                 given: StackedDraws | None = None, randomness: str | None = None
                 ) -> tuple[object, StackedDraws]:
    """``fn(replay)`` for k particles under vmap, and the guide's draws it made: ``fn`` runs
    one particle's pass, the guide replayed on ``replay`` (one particle's ``given`` draws as a
    trace; None where none are given) and returns its output with the guide's trace.
    ``randomness``: "different" where nothing is given (each particle draws its own), "error"
    where draws are given (a site the replay missed would draw: it raises instead)."""
    infer: dict[str, dict] = {}

    def one(values: dict):
        out, guide_trace = fn(as_trace(values, given.infer) if values else None)
        draws = latent_draws(guide_trace)
        infer.update({name: guide_trace.nodes[name]["infer"] for name in draws})
        return out, draws

    if randomness is None:
        randomness = "different" if given is None else "error"
    out, draws = vmapped(one, k, None if given is None else given.values, randomness)
    return out, StackedDraws(draws, infer)


def unbatched_reason(error: BaseException) -> str:
    """Why vmap could not take a program, in one line, with the user's line where it is in
    their code."""
    reason = f"{type(error).__name__}: {first_line(error)}{user_frame(error)}"
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith("enum_messenger.py"):
            return reason + " (Pyro's enumeration of a discrete site reads value.data)"
        tb = tb.tb_next
    return reason
