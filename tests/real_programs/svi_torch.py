"""Pyro's examples/svi_torch.py: a ``PyroModule`` model with a ``zero`` buffer, global coeff,
bias and scale, ``forward(covariates, data=None)`` and the plate
``pyro.plate("data", self.size, len(covariates))`` (full size declared, the minibatch handed in
from outside), as written there; an ``AutoNormal`` guide, and
``pyro.settings.set(module_local_params=True)`` so that parameters live in the modules.

    coeff ~ Normal(0, 1), bias ~ Normal(0, 1), scale ~ LogNormal(0, 1)
    data_n ~ Normal(bias + coeff * covariate_n, scale)
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule


class Model(PyroModule):
    def __init__(self, size):
        super().__init__()
        self.size = size
        self.register_buffer("zero", torch.tensor(0.0))

    def forward(self, covariates, data=None):
        coeff = pyro.sample("coeff", dist.Normal(self.zero, 1))
        bias = pyro.sample("bias", dist.Normal(self.zero, 1))
        scale = pyro.sample("scale", dist.LogNormal(self.zero, 1))
        with pyro.plate("data", self.size, len(covariates)):
            loc = bias + coeff * covariates
            return pyro.sample("obs", dist.Normal(loc, scale), obs=data)


def data(size: int = 200, seed: int = 0):
    """(covariates, data)."""
    g = torch.Generator().manual_seed(seed)
    covariates = torch.randn(size, generator=g)
    return covariates, 0.5 + 1.5 * covariates + 0.7 * torch.randn(size, generator=g)
