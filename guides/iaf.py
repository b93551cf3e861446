"""The amortized inverse-autoregressive-flow guide (Kingma et al. 2016).

    e ~ Normal(mu(x_n), diag sigma(x_n)^2),   z_n = f_L(... f_1(e; h(x_n)) ...; h(x_n))   site "z"

Each f_l is an affine autoregressive transform conditioned on the encoder's hidden state h(x_n)
(Pyro's ``ConditionalAffineAutoregressive``, orders reversed between layers); q's density is
the base density times the flows' Jacobians, which Pyro's TransformedDistribution computes.
No closed-form KL to the prior exists, so the diagnostics estimate it by Monte Carlo, and say so.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn

from .mean_field import MIN_SCALE, mlp_body


class IAFGuide(nn.Module):
    """Encoder network and ``flows`` conditional IAF layers; ``guide(x)`` is q(z | x)."""

    def __init__(self, data_dim: int, latent_dim: int = 50, hidden_dims: Sequence[int] = (400,),
                 flows: int = 2, site: str = "z"):
        super().__init__()
        if flows < 1:
            raise ValueError(f"flows must be a positive integer, got {flows}")
        self.latent_dim, self.site = latent_dim, site
        self.body, width = mlp_body(data_dim, hidden_dims)
        self.head = nn.Linear(width, 2 * latent_dim)
        flow_hidden = [max(2 * latent_dim, 16)]
        # Fixed orders, reversed from one layer to the next (Kingma et al.): Pyro's default is a
        # random permutation held in a buffer, which a checkpoint of parameters does not restore.
        order = torch.arange(latent_dim)
        self.flows = nn.ModuleList(
            ConditionalAffineAutoregressive(ConditionalAutoRegressiveNN(
                latent_dim, width, flow_hidden,
                permutation=order if layer % 2 == 0 else order.flip(0)))
            for layer in range(flows))

    def distribution(self, x: torch.Tensor) -> dist.TransformedDistribution:
        hidden = self.body(x)
        loc, raw_scale = self.head(hidden).chunk(2, dim=-1)
        base = dist.Normal(loc, F.softplus(raw_scale) + MIN_SCALE).to_event(1)
        return dist.ConditionalTransformedDistribution(base, list(self.flows)).condition(hidden)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample(self.site, self.distribution(x))
