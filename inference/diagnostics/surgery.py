"""ELBO surgery (Hoffman & Johnson 2016): the mean KL to the prior split in two,

    mean_n KL(q(z | x_n) || p(z)) = I_q(x; z) + KL(q(z) || p(z)),

with q(z) = (1/N) sum_n q(z | x_n) the aggregate posterior of the N evaluated points.  The mutual
information I_q(x; z) is what the code carries about x (at most log N); the marginal KL is what the
aggregate posterior's mismatch with the prior costs.  Estimated as in ``rtqichen/beta-tcvae``'s
``elbo_decomposition.py``: draws z ~ q(z | x_n), and log q(z) by the mean of q(z | x_m) over all
m, evaluated in chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro import poutine

from ..foundations.conventions import inspect_pair
from ..foundations.data_plate import takes_program_arguments
from ..foundations.errors import ConventionError
from ..foundations.pair_layout import per_datapoint
from ..foundations.program_data import ProgramData
from ..foundations.statistics import mean_and_se
from ..foundations.traces import (
    data_frame,
    guide_is_a_function_of_x,
    sample_sites,
    site_log_prob,
    trace_pair,
)
from ..foundations.wording import counted
from .passes import checked_arguments

DEFAULT_CHUNK_ELEMENTS = 2**24


@dataclass
class ElboSurgery:
    """Per evaluated point, averaged over its draws: log q(z|x_n) - log q(z) (the mutual
    information's terms) and log q(z) - log p(z) (the marginal KL's)."""

    mutual_information: torch.Tensor
    marginal_kl: torch.Tensor
    num_samples: int

    @property
    def num_data(self) -> int:
        return len(self.mutual_information)

    def summary(self) -> dict:
        return {"mutual_information": mean_and_se(self.mutual_information),
                "marginal_kl": mean_and_se(self.marginal_kl),
                "mean_kl": mean_and_se(self.mutual_information + self.marginal_kl),
                "log_num_data": math.log(self.num_data), "num_samples": self.num_samples,
                "note": f"I_q(x; z) <= log N = {math.log(self.num_data):.3f} nats for N = "
                        f"{counted(self.num_data, 'point')}: an aggregate posterior of N points cannot "
                        "carry more"}


def _log_q_all(site_fn, values: torch.Tensor, site: dict, layout, data_plate: str,
               start: int, stop: int) -> torch.Tensor:
    """log q(z_{s,n'} | x_m) for the draws of points start..stop-1 and every point m:
    ``[S, stop - start, N]``."""
    event = site_fn.event_dim
    width = layout.max_plate_nesting + 1
    batch = values.dim() - event  # == width: the particle dim and every plate dim
    axis = data_frame(site, data_plate).dim + width  # data axis among the batch dims
    mine = values.narrow(axis, start, stop - start).movedim(axis, 1)  # [S, n', rest..., event]
    mine = mine.unsqueeze(axis + 1)  # a singleton where the data axis was, after the n' dim
    log_prob = site_fn.log_prob(mine)  # [S, n', batch with N at the data axis]
    others = [d for d in range(2, 1 + batch) if d != axis + 1]
    if others:
        log_prob = log_prob.sum(dim=others, keepdim=True)
    return log_prob.reshape(log_prob.shape[0], log_prob.shape[1], -1)


@takes_program_arguments
def elbo_surgery(model: Callable, guide: Callable, x: ProgramData, *, num_samples: int = 10,
                 data_plate: str | None = None,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> ElboSurgery:
    """The mutual information and marginal KL of the guide on the points ``x`` (all of them
    make up the aggregate posterior), from ``num_samples`` draws per point."""
    checked_arguments(x, num_samples, None, "elbo_surgery")
    with torch.no_grad():
        layout = inspect_pair(model, guide, x, data_plate)
        if not layout.per_datapoint or layout.conditional:
            raise ConventionError(
                "ELBO surgery splits the KL of local latents under an unconditional prior p(z); "
                + ("the prior here is conditional on inputs" if layout.conditional else
                   f"sites {list(layout.global_sites)} are global"))
        if not layout.vectorized:
            raise ConventionError("ELBO surgery draws all samples in one particle plate: the pair "
                                  "must broadcast over a leading particle dimension")
        if (site := guide_is_a_function_of_x(guide, x, layout.latent)) is not None:
            raise ConventionError(
                f"ELBO surgery needs q(z | x) to factorize over the latent sites, each a function "
                f"of x alone; guide site '{site}' changes with the other draws (a hierarchical "
                "guide)")
        n = x.shape[0]
        guide_trace, model_trace = trace_pair(model, guide, x, num_samples, layout.particle_dim)
        single = sample_sites(poutine.trace(guide).get_trace(x))
        guide_sites, model_sites = sample_sites(guide_trace), sample_sites(model_trace)

        def reduce(values, site):
            return per_datapoint(values, site, layout, data_plate).expand(num_samples, n).double()

        log_q_own = sum(reduce(site_log_prob(guide_sites[s]), guide_sites[s]) for s in layout.latent)
        log_p = sum(reduce(site_log_prob(model_sites[s]), model_sites[s]) for s in layout.latent)
        event = sum(guide_sites[s]["value"][0].numel() // n for s in layout.latent)
        step = max(1, chunk_elements // max(1, num_samples * n * event))
        log_qz = []
        for start in range(0, n, step):
            stop = min(n, start + step)
            total = sum(_log_q_all(single[s]["fn"], guide_sites[s]["value"], guide_sites[s],
                                   layout, data_plate, start, stop).double()
                        for s in layout.latent)
            log_qz.append(torch.logsumexp(total, -1) - math.log(n))
        log_qz = torch.cat(log_qz, 1)
    return ElboSurgery(mutual_information=(log_q_own - log_qz).mean(0).cpu(),
                       marginal_kl=(log_qz - log_p).mean(0).cpu(), num_samples=num_samples)
