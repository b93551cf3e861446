"""The ``synthetic`` data set: 1200 points from a fixed factor-analysis model whose evidence is
known exactly,

    z ~ Normal(0, I_k),   x | z ~ Normal(W z + b, diag(psi)),   so   x ~ Normal(b, W W^T + diag(psi)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dataset import DATA_SEED, Dataset

SYNTHETIC_DIM, SYNTHETIC_LATENT, SYNTHETIC_TRAIN, SYNTHETIC_TEST = 10, 3, 1000, 200


@dataclass(frozen=True)
class FactorAnalysis:
    """The data-generating model: W (D x k), b (D), psi (D)."""

    weight: torch.Tensor
    bias: torch.Tensor
    psi: torch.Tensor

    def sample(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``num`` points x ~ p(x), without touching the global random stream."""
        z = torch.randn(num, self.weight.shape[1], generator=generator)
        noise = torch.randn(num, self.weight.shape[0], generator=generator)
        return z @ self.weight.T + self.bias + noise * self.psi.sqrt()

    def log_evidence(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x_n), shape [N]."""
        cov = self.weight @ self.weight.T + torch.diag(self.psi)
        return torch.distributions.MultivariateNormal(
            self.bias, scale_tril=torch.linalg.cholesky(cov)).log_prob(x)


def synthetic_truth() -> FactorAnalysis:
    g = torch.Generator().manual_seed(DATA_SEED)
    weight = torch.randn(SYNTHETIC_DIM, SYNTHETIC_LATENT, generator=g)
    bias = torch.randn(SYNTHETIC_DIM, generator=g)
    psi = 0.1 + 0.4 * torch.rand(SYNTHETIC_DIM, generator=g)
    # psi as the models store it (softplus of its inverse), so that the points are bit for bit
    # those a linear-Gaussian model with these parameters draws.
    return FactorAnalysis(weight, bias, F.softplus(psi + torch.log(-torch.expm1(-psi))))


def load_synthetic() -> Dataset:
    x = synthetic_truth().sample(SYNTHETIC_TRAIN + SYNTHETIC_TEST,
                                 torch.Generator().manual_seed(DATA_SEED + 1))
    return Dataset("synthetic", x[:SYNTHETIC_TRAIN], x[SYNTHETIC_TRAIN:], None, "gaussian")
