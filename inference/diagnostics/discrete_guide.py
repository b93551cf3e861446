"""Discrete latent sites the guide samples, summed over their values.

A guide that draws a discrete site (an amortized ``Categorical`` under ``TraceGraph_ELBO``, the
label of a semi-supervised VAE) makes the reconstruction a Monte Carlo mean over the draws, while
torch's closed-form KL of the site is exact over every value: where all K draws land on one value
the two disagree by the rare values' share, and a point's SE comes out 0 for a number that is not
exact.  So each particle of such a pair is taken at every value of its discrete guide sites
(together: ``MAX_VALUES`` combinations at most), every term weighted by q(value | x), as Pyro's
``TraceEnum_ELBO`` sums an enumerated guide site:

* the ELBO terms (reconstruction, each site's KL, E_q[z]) are their q-weighted sums over values;
* the importance weight is the Rao-Blackwellized one,
  w = sum_c q(c | x) p(x, c, z_c) / q(c, z_c | x), an unbiased estimate of p(x) as the plain
  weight is, with the discrete part exact;
* the ELBO's control variate is centred on sum_c q(c | x) log w_c, the per-particle ELBO, since
  log w above is no longer one.

Each discrete guide site's KL is the mean of log q(c) - log p(c) (no closed form,
``conventions``): summed over the values as above it is exact; where they are not summed over (a
discrete guide site outside the data plate, too many values) it is Monte Carlo over the same
draws as the reconstruction.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from pyro.poutine.messenger import Messenger

from ..foundations.log_density import log_density
from ..foundations.pair_layout import PairLayout, per_datapoint
from .kl import ENUMERATED
from .passes import traced_terms
from .terms import KLTerm, ParticleTerms
from .vmapped_pass import vmapped_terms

# Combinations of discrete guide values taken per particle; beyond, Monte Carlo.
MAX_VALUES = 64


def enumerates(layout: PairLayout) -> bool:
    """Whether ``evaluate`` takes this pair's discrete guide sites at every value."""
    return bool(layout.discrete_guide) and layout.per_datapoint and \
        layout.discrete_values <= MAX_VALUES


def discrete_note(layout: PairLayout) -> str | None:
    if not layout.discrete_guide:
        return None
    if enumerates(layout):
        return (f"the guide's discrete site(s) {list(layout.discrete_guide)} are summed over "
                f"their {layout.discrete_values} value(s) per particle, each term weighted by "
                "q(value | x): reconstruction and KL over the same distribution, the importance "
                "weight Rao-Blackwellized over them")
    why = ("the unit is the data set: their values are not summed per point"
           if not layout.per_datapoint
           else f"{layout.discrete_values} combinations of values, more than {MAX_VALUES}")
    return (f"the guide's discrete site(s) {list(layout.discrete_guide)} ({why}) are Monte "
            "Carlo in both terms of the ELBO, reconstruction and KL over the same draws")


class _FixedValues(Messenger):
    """Gives each named site the value at index ``c`` of its support, for every point."""

    def __init__(self, values: dict[str, int]):
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg: dict) -> None:
        c = self.values.get(msg["name"])
        if c is None or msg["is_observed"]:
            return
        fn = msg["fn"]
        support = fn.enumerate_support(expand=False)
        msg["value"] = support[c].expand(fn.batch_shape + fn.event_shape)
        msg["done"] = True


def enumerated_particles(model: Callable, guide: Callable, x, layout: PairLayout, k: int,
                         data_plate: str) -> ParticleTerms:
    """The terms of ``k`` particles, each at every combination of the discrete guide values."""
    names = list(layout.discrete_guide)
    parts, log_q = [], []
    for combination in itertools.product(*(range(c) for c in layout.discrete_counts)):
        fixed = _FixedValues(dict(zip(names, combination, strict=True)))(guide)
        # Unmasked: a masked point's value is still drawn from q, and still read downstream.
        if layout.vmap is not None and k > 1:
            terms, _, densities = vmapped_terms(model, fixed, x, layout, k, data_plate,
                                                guide_densities=tuple(names))
            lq = sum(densities.values())
        else:
            terms, passes = traced_terms(model, fixed, x, layout, k, data_plate)
            lq = torch.cat([sum(per_datapoint(log_density(g.nodes[n]["fn"], g.nodes[n]["value"]),
                                              g.nodes[n], layout, data_plate).double()
                                for n in names)
                            .expand(terms.log_weight.shape[0] // len(passes), -1)
                            for g, _ in passes])
        parts.append(terms)
        log_q.append(lq)
    # Normalized over the values (their probabilities sum to 1 up to rounding).
    q = torch.softmax(torch.stack(log_q), 0)

    def mean(values: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(values)
        weights = q.reshape(q.shape + (1,) * (stacked.dim() - q.dim()))
        return (weights * stacked).sum(0)

    log_w = torch.stack([t.log_weight for t in parts])
    first = parts[0]
    return ParticleTerms(
        log_weight=torch.logsumexp(q.log() + log_w, 0),
        global_log_weight=first.global_log_weight,
        reconstruction=mean([t.reconstruction for t in parts]),
        global_reconstruction=first.global_reconstruction,
        kl={name: KLTerm(mean([t.kl[name].value for t in parts]),
                         ENUMERATED if name in layout.discrete_guide else term.method)
            for name, term in first.kl.items()},
        latent_mean={name: mean([t.latent_mean[name] for t in parts])
                     for name in first.latent_mean},
        guide_observed=mean([t.guide_observed for t in parts]),
        global_guide_observed=first.global_guide_observed,
        log_q=mean([t.log_q for t in parts]),
        global_log_q=first.global_log_q,
        elbo_log_weight=mean(list(log_w)),
    )
