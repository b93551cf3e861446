"""The amortized full-covariance Gaussian guide.

    q(z_n | x_n) = MultivariateNormal(z_n; mu(x_n), L(x_n) L(x_n)^T)       latent site "z"

mu and the lower-triangular Cholesky factor L come from one MLP encoder; L's diagonal is
softplus(.) + 1e-4, so that q is always a proper Gaussian.  Its family holds every Gaussian
posterior, so on a linear-Gaussian model (and a linear encoder) its approximation gap is zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from .mean_field import MIN_SCALE, mlp_body


class FullRankGuide(nn.Module):
    """Encoder network; ``guide(x)`` is the Pyro program q(z | x)."""

    def __init__(self, data_dim: int, latent_dim: int = 50, hidden_dims: Sequence[int] = (400,),
                 site: str = "z"):
        super().__init__()
        self.latent_dim, self.site = latent_dim, site
        self.body, width = mlp_body(data_dim, hidden_dims)
        rows, cols = torch.tril_indices(latent_dim, latent_dim)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.head = nn.Linear(width, latent_dim + len(rows))

    def encode_cholesky(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mu(x) and L(x), shapes [N, k] and [N, k, k]."""
        out = self.head(self.body(x))
        k = self.latent_dim
        loc, entries = out[..., :k], out[..., k:]
        tril = loc.new_zeros(loc.shape[:-1] + (k, k))
        tril[..., self.rows, self.cols] = entries
        diagonal = F.softplus(tril.diagonal(dim1=-2, dim2=-1)) + MIN_SCALE
        return loc, tril.tril(-1) + torch.diag_embed(diagonal)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self)
        with pyro.plate("data", x.shape[0]):
            loc, scale_tril = self.encode_cholesky(x)
            pyro.sample(self.site, dist.MultivariateNormal(loc, scale_tril=scale_tril))
