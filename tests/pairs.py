"""Small hand-written model/guide pairs that are not the VAE, for testing genericity."""

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints


def two_site_model(x):
    """s_n ~ LogNormal(0, 1) (a scalar per point), z_n ~ N(0, I_3), x_n | z, s ~ N(z, s)."""
    with pyro.plate("data", x.shape[0]):
        s = pyro.sample("s", dist.LogNormal(x.new_zeros(()), 1.0))
        z = pyro.sample("z", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, s.unsqueeze(-1)).to_event(1), obs=x)


def two_site_guide(x):
    """q(s_n) = Gamma(a, b) (no closed-form KL to a LogNormal), q(z_n) = N(w x_n, sigma)."""
    a = pyro.param("a", torch.tensor(2.0), constraint=constraints.positive)
    b = pyro.param("b", torch.tensor(2.0), constraint=constraints.positive)
    w = pyro.param("w", torch.tensor(0.5))
    sigma = pyro.param("sigma", torch.full((3,), 0.7), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("s", dist.Gamma(a, b))
        pyro.sample("z", dist.Normal(w * x, sigma).to_event(1))


def plated_features_model(x):
    """Data plate at dim -2, features in a nested plate at dim -1: z_n ~ N(0,1), x_nj ~ N(z_n, 1)."""
    with pyro.plate("data", x.shape[0], dim=-2):
        z = pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0))
        with pyro.plate("features", x.shape[1], dim=-1):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def plated_features_guide(x):
    scale = pyro.param("scale", torch.tensor(0.5), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0], dim=-2):
        pyro.sample("z", dist.Normal(x.mean(-1, keepdim=True), scale))


# What a user writes for ``--model FILE:make``: a file whose factory returns a linear decoder's
# model and a linear encoder's guide.
LINEAR_PAIR_FILE = '''
import pyro
import pyro.distributions as dist
import torch
from torch import nn


def make(data_dim, latent_dim=2):
    decoder, encoder = nn.Linear(latent_dim, data_dim), nn.Linear(data_dim, 2 * latent_dim)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    return model, guide
'''
