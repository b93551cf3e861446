"""Mean-field guides for the linear-Gaussian model.

    LinearEncoderGuide:     q(z_n | x_n) = Normal(A x_n + c, diag(s^2))             site "z"
    OptimalMeanFieldGuide:  q(z_n | x_n) = Normal(E[z | x_n], diag(1 / Lambda_ii))   site "z"

The linear encoder can represent the optimal mean-field guide exactly (the posterior mean is
linear in x and Lambda does not depend on x), so after training it has no amortization gap.
The optimal guide is computed from the model in closed form and has no parameters of its own;
``scale_factor`` and ``loc_offset`` make it deliberately imperfect, for tests and demonstrations.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from ..models.linear_gaussian import LinearGaussian
from .mean_field import MIN_SCALE


class LinearEncoderGuide(nn.Module):
    def __init__(self, data_dim: int, latent_dim: int = 2):
        super().__init__()
        self.linear = nn.Linear(data_dim, latent_dim)
        self.raw_scale = nn.Parameter(torch.zeros(latent_dim))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(x), F.softplus(self.raw_scale) + MIN_SCALE

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("linear_encoder", self)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encode(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


class OptimalMeanFieldGuide:
    def __init__(self, model: LinearGaussian, scale_factor: float = 1.0, loc_offset: float = 0.0):
        if not hasattr(model, "optimal_mean_field"):
            raise TypeError(
                f"the optimal mean-field guide is known in closed form only for the "
                f"linear-Gaussian model, not {type(model).__name__}"
            )
        self.linear_gaussian = model
        self.scale_factor = scale_factor
        self.loc_offset = loc_offset

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Detached: the guide follows the model but is not a path for the model's gradient,
        # so SVI with this guide is variational EM.
        with torch.no_grad():
            loc, scale = self.linear_gaussian.optimal_mean_field(x)
        return loc + self.loc_offset, scale * self.scale_factor

    def guide(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encode(x)
            pyro.sample("z", dist.Normal(loc, scale.expand_as(loc)).to_event(1))
