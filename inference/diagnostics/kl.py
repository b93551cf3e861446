"""KL(q(z|x) || p(z)) for one latent site, analytic where torch knows the closed form.

For mean-field guides the KL factorizes over coordinates, so it is computed per coordinate of the
site's event (``Independent`` wrappers peeled off both sides) and summed afterwards: the same
numbers give the per-site total and the per-dimension breakdown.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributions import Distribution, Independent, kl_divergence

ANALYTIC = "analytic"
MONTE_CARLO = "monte-carlo"
# A discrete guide site's KL summed over its values, q-weighted (``discrete_guide``): exact.
ENUMERATED = "enumerated"


@dataclass(frozen=True)
class SiteKL:
    """KL of one site: ``value`` has the site's batch shape followed by ``event_ndim`` dims."""

    value: torch.Tensor
    event_ndim: int
    method: str


def _peel(d: Distribution) -> tuple[Distribution, int]:
    ndim = 0
    while isinstance(d, Independent):
        ndim += d.reinterpreted_batch_ndims
        d = d.base_dist
    return d, ndim


def kl_to_prior(q: Distribution, p: Distribution, z: torch.Tensor,
                closed_form: bool = True) -> SiteKL:
    """KL(q || p), per coordinate when both sides factorize the same way.

    Falls back to the one-sample Monte Carlo estimate log q(z) - log p(z) at the guide's sample
    ``z`` (its mean over particles is unbiased) when torch has no registered closed form, or
    when the caller says a closed form is not valid for the pair at hand (``closed_form``).
    """
    base_q, nq = _peel(q)
    base_p, np_ = _peel(p)
    factorized = nq == np_ and not base_q.event_shape and not base_p.event_shape
    pairs = [(base_q, base_p, nq)] if factorized else []
    pairs.append((q, p, 0))
    for qq, pp, ndim in pairs if closed_form else ():
        try:
            return SiteKL(kl_divergence(qq, pp), ndim, ANALYTIC)
        except NotImplementedError:
            continue
    qq, pp, ndim = pairs[0]
    return SiteKL(qq.log_prob(z) - pp.log_prob(z), ndim, MONTE_CARLO)
