"""Trace_ELBO with several particles for a pair that Pyro's ``vectorize_particles`` cannot take
(it does not broadcast over a leading particle dimension): the particles under
``torch.func.vmap`` (``foundations.particle_vmap``), each one a plain pass of the pair.

Each particle's ELBO is log p(x, z) - log q(z | x) summed over the traces' sites with their
scales and masks, as ``Trace_ELBO`` sums them; where every guide site is reparameterized that is
also its surrogate, so the gradient is Trace_ELBO's.  The loss is minus their mean.  Before it is
used, ``check`` compares each of two particles with Pyro's own ``Trace_ELBO`` on the pair
replayed at that particle's draws; a guide with a site that is not reparameterized (its
gradient needs Pyro's score-function terms), or a pair vmap cannot take, trains with Pyro's
particle loop (``vectorize_particles=False``) instead, for the reason ``check`` gives.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from ..foundations.particle_vmap import StackedDraws, unbatched_reason, vmapped_pair
from ..foundations.rng import rng_preserved


class VmappedTraceELBO:
    """``loss`` / ``differentiable_loss`` as Pyro's ELBOs have them, ``num_particles`` at once."""

    def __init__(self, num_particles: int):
        self.num_particles = num_particles

    def _elbos(self, model: Callable, guide: Callable, args: tuple, kwargs: dict, k: int,
               given: StackedDraws | None = None) -> tuple[torch.Tensor, StackedDraws]:
        def one(replay):
            replayed = guide if replay is None else poutine.replay(guide, trace=replay)
            guide_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs)
            return model_trace.log_prob_sum() - guide_trace.log_prob_sum(), guide_trace

        with pyro.validation_enabled(False):
            return vmapped_pair(one, k, given)

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs
                            ) -> torch.Tensor:
        elbos, _ = self._elbos(model, guide, args, kwargs, self.num_particles)
        return -elbos.mean()

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def check(self, model: Callable, guide: Callable, *args, **kwargs) -> str | None:
        """None where, on two particles, each ELBO equals Pyro's Trace_ELBO of the pair
        replayed at its draws; else why the particles cannot be vmapped."""
        try:
            with rng_preserved(), torch.no_grad():
                guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
                for name, site in guide_trace.nodes.items():
                    if (site["type"] == "sample" and not site["is_observed"]
                            and not getattr(site["fn"], "has_rsample", False)):
                        return (f"guide site '{name}' is not reparameterized: its gradient "
                                "needs Pyro's score-function terms")
                elbos, draws = self._elbos(model, guide, args, kwargs, 2)
                for j in range(2):
                    replayed = poutine.replay(guide, trace=draws.particle(j))
                    with pyro.validation_enabled(False):
                        plain = -Trace_ELBO().loss(model, replayed, *args, **kwargs)
                    if not torch.isclose(elbos[j].double(), torch.tensor(plain, dtype=torch.float64),
                                         rtol=1e-4, atol=1e-3):
                        return (f"under vmap a particle's ELBO ({float(elbos[j]):.6g}) differs "
                                f"from Pyro's Trace_ELBO at the same draws ({plain:.6g})")
        except Exception as e:  # noqa: BLE001 - what vmap cannot take: Pyro's loop, with why
            return unbatched_reason(e)
        return None


class ParticlesOfAnyPair:
    """An ELBO of Pyro's with several particles for a pair that does not broadcast over them:
    Trace_ELBO's particles vmapped where ``VmappedTraceELBO.check`` passes on the first
    minibatch, else (or for another ELBO) Pyro's own loop over the particles; ``note`` says
    which, and why."""

    def __init__(self, elbo_class: type, num_particles: int, **options):
        self.vmapped = VmappedTraceELBO(num_particles) if elbo_class is Trace_ELBO else None
        self.looped = elbo_class(num_particles=num_particles, vectorize_particles=False,
                                 **options)
        self.name = elbo_class.__name__
        self.chosen = None
        self.note: str | None = None

    def _choose(self, model: Callable, guide: Callable, args: tuple, kwargs: dict):
        if self.chosen is None:
            reason = ("vmap is used for Trace_ELBO only" if self.vmapped is None
                      else self.vmapped.check(model, guide, *args, **kwargs))
            self.chosen = self.looped if reason else self.vmapped
            self.note = (
                f"the pair does not broadcast over a leading particle dimension: its "
                f"{self.looped.num_particles} particles per step are "
                + (f"drawn one by one ({self.name}, vectorize_particles=False): {reason}"
                   if reason else "vectorized with torch.func.vmap (checked against Pyro's "
                   "Trace_ELBO at the same draws)"))
        return self.chosen

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs):
        return self._choose(model, guide, args, kwargs).differentiable_loss(
            model, guide, *args, **kwargs)

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        return self._choose(model, guide, args, kwargs).loss(model, guide, *args, **kwargs)
