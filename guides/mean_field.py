"""The amortized mean-field guide.

    q(z_n | x_n) = prod_i Normal(z_ni; mu_i(x_n), sigma_i(x_n))       latent site "z"

mu and sigma come from one MLP encoder; sigma = softplus(.) + 1e-4 stays positive without the
overflow of exp.  With no hidden layers the encoder is linear.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

MIN_SCALE = 1e-4


def mlp_body(data_dim: int, hidden_dims: Sequence[int]) -> tuple[nn.Module, int]:
    """Linear + softplus layers of the given widths, and the width of their output."""
    layers: list[nn.Module] = []
    sizes = [data_dim, *hidden_dims]
    for a, b in zip(sizes[:-1], sizes[1:], strict=False):
        layers += [nn.Linear(a, b), nn.Softplus()]
    return nn.Sequential(*layers), sizes[-1]


class MeanFieldGuide(nn.Module):
    """Encoder network; ``guide(x)`` is the Pyro program q(z | x)."""

    def __init__(
        self,
        data_dim: int,
        latent_dim: int = 50,
        hidden_dims: Sequence[int] = (400,),
        site: str = "z",
    ):
        super().__init__()
        self.latent_dim = latent_dim
        self.site = site
        self.body, width = mlp_body(data_dim, hidden_dims)
        self.head = nn.Linear(width, 2 * latent_dim)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw_scale = self.head(self.body(x)).chunk(2, dim=-1)
        return loc, F.softplus(raw_scale) + MIN_SCALE

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encode(x)
            pyro.sample(self.site, dist.Normal(loc, scale).to_event(1))
