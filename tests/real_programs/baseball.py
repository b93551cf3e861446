"""Mirrors Pyro's examples/baseball.py: the ``not_pooled`` and ``partially_pooled`` models.

As there, the data are (at-bats, hits) per player; here one tensor, column 0 at-bats and column
1 hits (elbogap's convention: one data tensor).  The plate is ``num_players``, as in the
original.  The original fits them with MCMC; a Pyro user trying SVI takes an autoguide.

not_pooled:        phi_i ~ Uniform(0, 1),  hits_i ~ Binomial(at_bats_i, phi_i)
                   exact: log p(hits_i) = -log(at_bats_i + 1)
partially_pooled:  m ~ Uniform(0, 1), kappa ~ Pareto(1, 1.5)           (global latents)
                   phi_i ~ Beta(m kappa, (1 - m) kappa),  hits_i ~ Binomial(at_bats_i, phi_i)
"""

import pyro
import pyro.distributions as dist
import torch

PLATE = "num_players"


def data(num_players: int = 18, at_bats: int = 45, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    phi = 0.2 + 0.15 * torch.rand(num_players, generator=g)
    n = torch.full((num_players,), float(at_bats))
    hits = torch.binomial(n, phi, generator=g)
    return torch.stack([n, hits], dim=1)


def not_pooled(x):
    at_bats, hits = x[:, 0], x[:, 1]
    with pyro.plate(PLATE, x.shape[0]):
        phi = pyro.sample("phi", dist.Uniform(x.new_zeros(()), x.new_ones(())))
        return pyro.sample("obs", dist.Binomial(at_bats, phi), obs=hits)


def partially_pooled(x):
    at_bats, hits = x[:, 0], x[:, 1]
    m = pyro.sample("m", dist.Uniform(x.new_zeros(()), x.new_ones(())))
    kappa = pyro.sample("kappa", dist.Pareto(x.new_ones(()), x.new_tensor(1.5)))
    with pyro.plate(PLATE, x.shape[0]):
        phi = pyro.sample("phi", dist.Beta(m * kappa, (1 - m) * kappa))
        return pyro.sample("obs", dist.Binomial(at_bats, phi), obs=hits)


def exact_not_pooled(x) -> torch.Tensor:
    return -torch.log(x[:, 0].double() + 1)
