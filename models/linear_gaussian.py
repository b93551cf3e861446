"""Factor analysis (probabilistic PCA when psi is isotropic): a model whose evidence is exact.

    z_n       ~ Normal(0, I_k)                                   latent site "z"
    x_n | z_n ~ Normal(W z_n + b, diag(psi))                     observed site "x"

Marginally x_n ~ Normal(b, W W^T + diag(psi)), and the posterior is Gaussian with precision
Lambda = I + W^T diag(1/psi) W (the same for every x_n) and mean Lambda^-1 W^T diag(1/psi)(x_n - b).
So log p(x), the posterior, and for any diagonal-Gaussian q(z | x_n) = N(m_n, diag(s_n^2)) the
ELBO and both KLs are known in closed form: the ground truth the estimators are checked against.
All linear algebra goes through Cholesky factors; no matrix is inverted explicitly.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn


class LinearGaussian(nn.Module):
    """``model(x)`` is the Pyro program; the other methods are its closed forms."""

    default_guide = "linear"

    def __init__(self, data_dim: int, latent_dim: int = 2, init_scale: float = 0.1):
        super().__init__()
        self.data_dim = data_dim
        self.latent_dim = latent_dim
        self.weight = nn.Parameter(init_scale * torch.randn(data_dim, latent_dim))
        self.bias = nn.Parameter(torch.zeros(data_dim))
        # psi = softplus(raw) stays positive; raw = 0.5413 gives psi = 1 at the start.
        self.raw_psi = nn.Parameter(torch.full((data_dim,), 0.5413))

    @classmethod
    def from_parameters(cls, weight: torch.Tensor, bias: torch.Tensor, psi: torch.Tensor):
        """A model with the given W (D x k), b (D) and psi (D) exactly."""
        model = cls(*weight.shape)
        with torch.no_grad():
            model.weight.copy_(weight)
            model.bias.copy_(bias)
            # Inverse softplus, written to stay finite for large psi.
            model.raw_psi.copy_(psi + torch.log(-torch.expm1(-psi)))
        return model

    @property
    def psi(self) -> torch.Tensor:
        return F.softplus(self.raw_psi)

    def model(self, x: torch.Tensor) -> None:
        pyro.module("linear_gaussian", self)
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(()), 1.0).expand([self.latent_dim]).to_event(1)
            z = pyro.sample("z", prior)
            mean = z @ self.weight.T + self.bias
            pyro.sample("x", dist.Normal(mean, self.psi.sqrt()).to_event(1), obs=x)

    def sample(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``num`` data points x ~ p(x) (without touching the global random stream)."""
        with torch.no_grad():
            z = torch.randn(num, self.latent_dim, generator=generator)
            noise = torch.randn(num, self.data_dim, generator=generator)
            return z @ self.weight.T + self.bias + noise * self.psi.sqrt()

    # ---- closed forms -------------------------------------------------------------------

    def log_evidence(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x_n) = log N(x_n; b, W W^T + diag(psi)), shape [N]."""
        cov = self.weight @ self.weight.T + torch.diag(self.psi)
        marginal = torch.distributions.MultivariateNormal(
            self.bias, scale_tril=torch.linalg.cholesky(cov)
        )
        return marginal.log_prob(x)

    def posterior_precision(self) -> torch.Tensor:
        """Lambda = I + W^T diag(1/psi) W, the posterior precision for every x_n (k x k)."""
        eye = torch.eye(self.latent_dim, dtype=self.weight.dtype, device=self.weight.device)
        return eye + self.weight.T @ (self.weight / self.psi.unsqueeze(-1))

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact posterior p(z | x_n) = N(mean_n, cov): mean [N, k] and the shared cov [k, k]."""
        chol = torch.linalg.cholesky(self.posterior_precision())
        rhs = ((x - self.bias) / self.psi) @ self.weight  # rows: W^T diag(1/psi)(x_n - b)
        mean = torch.cholesky_solve(rhs.T, chol).T
        eye = torch.eye(self.latent_dim, dtype=chol.dtype, device=chol.device)
        return mean, torch.cholesky_solve(eye, chol)

    def optimal_mean_field(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The diagonal Gaussian q minimizing KL(q || p(z | x_n)): loc [N, k], scale [k].

        For a Gaussian posterior with precision Lambda it has the posterior mean and variances
        1 / Lambda_ii (not the posterior's marginal variances, which are larger).
        """
        mean, _ = self.posterior(x)
        return mean, self.posterior_precision().diagonal().rsqrt()

    def kl_to_prior(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """KL(N(m, diag s^2) || N(0, I)) per data point."""
        var = scale.expand_as(loc) ** 2
        return 0.5 * (var + loc**2 - 1 - var.log()).sum(-1)

    def kl_to_posterior(
        self, x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        """KL(N(m_n, diag s_n^2) || p(z | x_n)) per data point: the true evidence gap."""
        precision = self.posterior_precision()
        mean, _ = self.posterior(x)
        var = scale.expand_as(loc) ** 2
        diff = mean - loc
        trace = (var * precision.diagonal()).sum(-1)
        mahalanobis = ((diff @ precision) * diff).sum(-1)
        logdet_precision = 2 * torch.linalg.cholesky(precision).diagonal().log().sum()
        return 0.5 * (trace + mahalanobis - self.latent_dim - logdet_precision - var.log().sum(-1))

    def expected_log_likelihood(
        self, x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        """E_q[log p(x_n | z)] for q = N(m_n, diag s_n^2): the reconstruction term, per point."""
        psi = self.psi
        resid = x - loc @ self.weight.T - self.bias
        spread = (scale.expand_as(loc) ** 2) @ (self.weight**2).T  # sum_i W_di^2 s_i^2
        return -0.5 * (
            (math.log(2 * math.pi) + psi.log()) + (resid**2 + spread) / psi
        ).sum(-1)

    def exact_diagnostics(
        self, x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Every quantity ``elbogap.evaluate`` estimates, in closed form, per data point."""
        reconstruction = self.expected_log_likelihood(x, loc, scale)
        kl_prior = self.kl_to_prior(loc, scale)
        return {
            "elbo": reconstruction - kl_prior,
            "reconstruction": reconstruction,
            "kl_prior": kl_prior,
            "log_evidence": self.log_evidence(x),
            "evidence_gap": self.kl_to_posterior(x, loc, scale),
        }
