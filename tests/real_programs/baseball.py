"""Pyro's examples/baseball.py: ``fully_pooled``, ``not_pooled`` and ``partially_pooled``, with
their signature ``(at_bats, hits)`` and plate ``num_players`` as written there.  The original fits
them with MCMC; a Pyro user trying SVI takes an autoguide.

fully_pooled:      phi ~ Uniform(0, 1),   hits_i ~ Binomial(at_bats_i, phi)
not_pooled:        phi_i ~ Uniform(0, 1),  hits_i ~ Binomial(at_bats_i, phi_i)
                   exact: log p(hits_i) = -log(at_bats_i + 1)
partially_pooled:  m ~ Uniform(0, 1), kappa ~ Pareto(1, 1.5)           (global latents)
                   phi_i ~ Beta(m kappa, (1 - m) kappa),  hits_i ~ Binomial(at_bats_i, phi_i)
"""

import pyro
import pyro.distributions as dist
import torch


def data(num_players: int = 18, at_bats: int = 45, seed: int = 0):
    """(at_bats, hits), one entry per player."""
    g = torch.Generator().manual_seed(seed)
    phi = 0.2 + 0.15 * torch.rand(num_players, generator=g)
    n = torch.full((num_players,), float(at_bats))
    return n, torch.binomial(n, phi, generator=g)


def fully_pooled(at_bats, hits):
    phi = pyro.sample("phi", dist.Uniform(at_bats.new_tensor(0.0), at_bats.new_tensor(1.0)))
    num_players = at_bats.shape[0]
    with pyro.plate("num_players", num_players):
        return pyro.sample("obs", dist.Binomial(at_bats, phi), obs=hits)


def not_pooled(at_bats, hits):
    num_players = at_bats.shape[0]
    with pyro.plate("num_players", num_players):
        phi = pyro.sample("phi", dist.Uniform(at_bats.new_tensor(0.0), at_bats.new_tensor(1.0)))
        return pyro.sample("obs", dist.Binomial(at_bats, phi), obs=hits)


def partially_pooled(at_bats, hits):
    num_players = at_bats.shape[0]
    m = pyro.sample("m", dist.Uniform(at_bats.new_tensor(0.0), at_bats.new_tensor(1.0)))
    kappa = pyro.sample("kappa", dist.Pareto(at_bats.new_tensor(1.0), at_bats.new_tensor(1.5)))
    with pyro.plate("num_players", num_players):
        phi = pyro.sample("phi", dist.Beta(m * kappa, (1 - m) * kappa))
        return pyro.sample("obs", dist.Binomial(at_bats, phi), obs=hits)


def exact_not_pooled(at_bats) -> torch.Tensor:
    return -torch.log(at_bats.double() + 1)


def exact_fully_pooled(at_bats, hits) -> float:
    """phi ~ Uniform(0, 1) integrates out: a beta-binomial of the totals."""
    n, h = at_bats.double(), hits.double()
    return float((torch.lgamma(n + 1) - torch.lgamma(h + 1) - torch.lgamma(n - h + 1)).sum()
                 + torch.lgamma(h.sum() + 1) + torch.lgamma((n - h).sum() + 1)
                 - torch.lgamma(n.sum() + 2))
