"""Defensive importance sampling (Hesterberg 1995): the guide mixed with the prior as proposal.

Pareto k-hat judges the weights the proposal drew.  A mode of the posterior that q never
reaches leaves no trace in them: on a mixture whose labels can switch, q sits on one labelling,
log p(x) comes out about log 2 short, and k-hat is small.  Drawing a share alpha of the particles
from the prior p(z) instead, and weighting every particle against the mixture

    m(z) = (1 - alpha) q(z | x) + alpha p(z),     w = p(x, z) / m(z) <= p(x | z) / alpha,

keeps the estimate unbiased (the shares are drawn exactly: K from q, K_p from the prior, alpha =
K_p / (K + K_p)) and reaches every region the prior reaches.  It costs variance where q is good,
and the prior rarely lands in a narrow mode: a second opinion, beside AIS from the prior.  It
needs q's density at a z the guide did not draw, which a point mass driven by an auxiliary site
(an autoguide) does not have.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import pyro
import torch

from ..foundations.errors import ConventionError, OptionError
from ..foundations.pair_layout import PairLayout
from ..foundations.traces import trace_pair_from_prior
from ..foundations.weight_moments import WeightMoments
from .discrete_guide import enumerates
from .results import Diagnostics
from .terms import ParticleTerms, particle_terms


def check_defensive(alpha: float, layout: PairLayout) -> None:
    if not 0 <= alpha < 1:
        raise OptionError("defensive", f"must be in [0, 1) (the prior's share of the proposal), "
                          f"got {alpha}")
    if alpha and layout.auxiliary:
        raise ConventionError(
            f"defensive importance sampling scores q at draws from the prior, and the guide's "
            f"sites {list(layout.latent)} are point masses driven by auxiliary sites "
            f"{list(layout.auxiliary)} (an autoguide), whose density at a z they did not draw "
            "is not defined; use AIS from the prior (start='prior') as the second opinion")
    if alpha and enumerates(layout):
        raise ConventionError(
            f"defensive importance sampling mixes q's density at each draw with the prior's, "
            f"and the guide's discrete site(s) {list(layout.discrete_guide)} are summed over "
            "their values here, not drawn; use AIS (annealed_evidence) as the second opinion")
    if alpha and layout.subsample is not None:
        raise ConventionError("defensive importance sampling needs the pair to cover x in its "
                              "passes; its data plate picks its own minibatch of x")


def prior_draws(num_samples: int, alpha: float) -> int:
    """K_p, the draws from the prior beside K from q, so that K_p / (K + K_p) is alpha."""
    return max(1, round(alpha / (1 - alpha) * num_samples)) if alpha else 0


def prior_particles(model: Callable, guide: Callable, x: torch.Tensor, layout: PairLayout, k: int,
                    data_plate: str) -> ParticleTerms:
    """The terms of ``k`` draws of z from the prior, with q scored at them."""
    with pyro.validation_enabled(False):
        if layout.vectorized and k > 1:
            passes = [trace_pair_from_prior(model, guide, x, k, layout.particle_dim)]
        else:
            passes = [trace_pair_from_prior(model, guide, x) for _ in range(k)]
    return ParticleTerms.cat([
        particle_terms(g, m, layout, data_plate, k if len(passes) == 1 else 1, layout.rows(x))
        for g, m in passes])


class MixtureSums:
    """The mixture's weights log p(x, z) - log m(z) of both shares' particles, reduced as they
    come (``elbogap.foundations.weight_moments``): ``num_samples`` K from q, and the K_p of
    ``prior_draws`` from the prior."""

    def __init__(self, alpha: float, num_samples: int, keep_log_weights: bool = False):
        self.alpha = alpha
        self.moments = WeightMoments(num_samples + prior_draws(num_samples, alpha),
                                     keep_log_weights)

    def add(self, log_w: torch.Tensor, log_q: torch.Tensor, log_prior: torch.Tensor) -> None:
        """Particles as (log p(x, z) - log q, log q, log p(z)) per row."""
        log_m = torch.logaddexp(math.log1p(-self.alpha) + log_q,
                                math.log(self.alpha) + log_prior)
        self.moments.add(log_w + log_q - log_m)

    def apply(self, d: Diagnostics) -> Diagnostics:
        """``d`` with its evidence, gap, k-hat and ESS those of the mixture's weights (its
        ELBO and KL stay those of q's own draws)."""
        log_evidence, se = self.moments.log_mean_exp(), self.moments.log_mean_exp_se()
        return replace(
            d, log_evidence=log_evidence, log_evidence_se=se,
            evidence_gap=log_evidence - d.elbo,
            # The shares are drawn apart; q's draws are in both terms and their errors
            # correlate positively, so the sum of variances bounds the gap's.
            evidence_gap_se=(se.pow(2) + d.elbo_se.pow(2)).sqrt(),
            khat=self.moments.khat(), ess=self.moments.ess(),
            log_weights=self.moments.log_weights())


def defensive_note(alpha: float, num_samples: int) -> str:
    k_p = prior_draws(num_samples, alpha)
    return (f"log p(x) by defensive importance sampling: K={num_samples} draws from q and "
            f"{k_p} from the prior p(z), each weighted against the mixture (1 - a) q + a p(z), "
            f"a = {k_p / (num_samples + k_p):.3f}; its k-hat and ESS are the mixture's, the ELBO "
            "and KL those of q's draws")
