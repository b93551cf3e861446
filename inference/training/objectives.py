"""Training objectives beyond the ELBO, reduced per data point.

The importance-weighted bound (Burda et al. 2016) and its Rényi generalization (Li & Turner 2016),

    L_alpha(x_n) = 1 / (1 - alpha) log (1/K) sum_k w_kn^(1 - alpha),   w_kn = p(x_n, z_kn) / q(z_kn | x_n),

summed over the data points of a minibatch (and scaled to the data set like every data-plate
site).  alpha = 0 is IWAE; K = 1 (any alpha) is the ELBO.  Pyro 1.9's ``RenyiELBO`` keeps the
plates common to every site, so where every site is in the data plate it is per point as well
(tests/training/test_objectives.py checks the two agree); where a site sits outside the plate it sums
over the plate first and bounds the minibatch jointly (pyro-ppl/pyro#3104).  A per-point bound
does not exist there, and this objective refuses such a pair with the site's name instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..foundations.conventions import inspect_pair
from ..foundations.errors import ConventionError, OptionError
from ..foundations.pair_layout import PairLayout, per_datapoint
from ..foundations.particle_vmap import unbatched_reason, vmapped_pair
from ..foundations.rng import rng_preserved
from ..foundations.traces import data_frame, sample_sites, site_log_prob, trace_pair


class PerDatapointRenyiELBO:
    """``loss`` / ``differentiable_loss`` as Pyro's ELBOs have them: minus the bound."""

    def __init__(self, num_particles: int = 5, alpha: float = 0.0, data_plate: str = "data"):
        if num_particles < 1:
            raise OptionError("num_particles", f"must be a positive integer, got {num_particles}")
        if not (alpha >= 0 and alpha != 1):
            raise OptionError("renyi_alpha", f"must be >= 0 and not 1 (alpha = 1 is the ELBO: "
                                             f"elbo='trace'), got {alpha}")
        self.num_particles, self.alpha, self.data_plate = num_particles, alpha, data_plate
        self._layout: PairLayout | None = None
        self._loop_reason: str | None = None
        # How the particles of a pair that does not broadcast are drawn, and why.
        self.note: str | None = None

    def _log_weights(self, model: Callable, guide: Callable, x: torch.Tensor
                     ) -> tuple[torch.Tensor, float]:
        """Per particle and point log w ``[K, N]``, and the data plate's scale N / B."""
        if self._layout is None:
            with torch.no_grad():
                self._layout = inspect_pair(model, guide, x, self.data_plate)
            if not self._layout.per_datapoint:
                raise ConventionError(
                    f"the importance-weighted bound (elbo='iwae', --elbo iwae) bounds each data "
                    f"point's evidence: sites "
                    f"{list(self._layout.global_sites)} are outside plate '{self.data_plate}'")
            if not self._layout.vectorized and self.num_particles > 1:
                self._loop_reason = self._vmap_reason(model, guide, x)
                self.note = (
                    "the pair does not broadcast over a leading particle dimension: the "
                    "bound's particles are " + (
                        "vectorized with torch.func.vmap (checked against plain passes)"
                        if self._loop_reason is None else
                        f"drawn one by one: vmap could not take it ({self._loop_reason})"))
        layout, k = self._layout, self.num_particles
        if not layout.vectorized and k > 1 and self._loop_reason is None:
            (log_w, scale), _ = self._vmapped(model, guide, x, k)
            return log_w, scale
        if not layout.vectorized:
            parts = [self._point_log_weights(*trace_pair(model, guide, x), 1) for _ in range(k)]
            return torch.cat([p[0] for p in parts]), parts[0][1]
        guide_trace, model_trace = trace_pair(model, guide, x, k, layout.particle_dim)
        return self._point_log_weights(guide_trace, model_trace, k)

    def _point_log_weights(self, guide_trace, model_trace, k: int) -> tuple[torch.Tensor, float]:
        log_w, scale = 0.0, 1.0
        for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
            for site in sample_sites(trace).values():
                if data_frame(site, self.data_plate) is None:
                    continue
                values = per_datapoint(site_log_prob(site), site, self._layout, self.data_plate)
                log_w = log_w + sign * values
                scale = float(site["scale"])
        return torch.as_tensor(log_w).expand(k, -1), scale

    def _vmapped(self, model: Callable, guide: Callable, x, k: int, given=None):
        """``_point_log_weights`` of k particles of one plain pass each, under vmap; and the
        draws."""
        scale: list[float] = []

        def one(replay):
            guide_trace, model_trace = trace_pair(model, guide, x, replay_guide=replay)
            log_w, site_scale = self._point_log_weights(guide_trace, model_trace, 1)
            scale.append(site_scale)
            return log_w[0], guide_trace

        log_w, draws = vmapped_pair(one, k, given)
        return (log_w, scale[0]), draws

    def _vmap_reason(self, model: Callable, guide: Callable, x) -> str | None:
        """None where two vmapped particles' log-weights equal plain passes' at their draws."""
        try:
            with rng_preserved(), torch.no_grad():
                (log_w, _), draws = self._vmapped(model, guide, x, 2)
                for j in range(2):
                    traces = trace_pair(model, guide, x, replay_guide=draws.particle(j))
                    plain, _ = self._point_log_weights(*traces, 1)
                    if not torch.allclose(log_w[j], plain[0], rtol=1e-4, atol=1e-3):
                        return "under vmap a particle's log-weights differ from a plain pass's"
        except Exception as e:  # noqa: BLE001 - what vmap cannot take, named
            return unbatched_reason(e)
        return None

    def differentiable_loss(self, model: Callable, guide: Callable, x: torch.Tensor
                            ) -> torch.Tensor:
        log_w, scale = self._log_weights(model, guide, x)
        power = (1.0 - self.alpha) * log_w
        bound = (torch.logsumexp(power, 0) - math.log(self.num_particles)) / (1.0 - self.alpha)
        return -scale * bound.sum()

    def loss(self, model: Callable, guide: Callable, x: torch.Tensor) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, x).item()
