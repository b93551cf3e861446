"""The variational autoencoder's generative model (Kingma & Welling 2014).

    z_n       ~ Normal(0, I_d)                                   latent site "z"
    x_n | z_n ~ Bernoulli(logits = f(z_n))                       observed site "x", binary data
    x_n | z_n ~ Normal(sigmoid(f(z_n)), sigma)                   observed site "x", data in [0, 1]

f is an MLP decoder with softplus hidden layers.  sigma is a learned per-pixel parameter, or
fixed when ``likelihood_scale`` is given.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn

LIKELIHOODS = ("bernoulli", "gaussian")


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers with softplus between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        if i:
            layers.append(nn.Softplus())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """Decoder half of a VAE; ``model(x)`` is the Pyro program p(x, z)."""

    def __init__(
        self,
        data_dim: int,
        latent_dim: int = 50,
        hidden_dims: Sequence[int] = (400,),
        likelihood: str = "bernoulli",
        likelihood_scale: float | None = None,
    ):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        self.data_dim = data_dim
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.likelihood_scale = likelihood_scale
        self.decoder = mlp([latent_dim, *hidden_dims, data_dim])

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        if self.likelihood == "gaussian" and self.likelihood_scale is None:
            scale = pyro.param(
                "x_scale", lambda: x.new_full((self.data_dim,), 0.1), constraint=constraints.positive
            )
        else:
            scale = self.likelihood_scale
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(()), 1.0).expand([self.latent_dim]).to_event(1)
            z = pyro.sample("z", prior)
            out = self.decoder(z)
            if self.likelihood == "bernoulli":
                pyro.sample("x", dist.Bernoulli(logits=out).to_event(1), obs=x)
            else:
                pyro.sample("x", dist.Normal(torch.sigmoid(out), scale).to_event(1), obs=x)
