"""Mirrors Pyro's Bayesian regression tutorial (Part I): ``PyroModule[nn.Linear]`` with
``PyroSample`` priors on its weight and bias, sigma ~ Uniform(0, 10), an ``AutoDiagonalNormal``
guide; every latent variable is global.

    w ~ Normal(0, 1)^(1x3),  b ~ Normal(0, 10),  sigma ~ Uniform(0, 10)
    y_n ~ Normal(w . f_n + b, sigma)                                  plate "data"

``forward(x, y=None)`` as written there; elbogap is handed ``(x, y)`` as ``svi.step`` is.
``nn.Linear`` does not broadcast over a leading particle dimension of its weight (F.linear
needs a matrix), so elbogap vectorizes its particles with torch.func.vmap instead.
Exact evidence: given sigma, y ~ N(0, sigma^2 I + F F^T + 100 11^T); sigma by quadrature.
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from torch import nn


class BayesianRegression(PyroModule):
    def __init__(self, in_features: int = 3, out_features: int = 1, sigma: float | None = None):
        super().__init__()
        # A known noise scale (not the tutorial's): the evidence is then Gaussian, no quadrature.
        self.sigma = sigma
        self.linear = PyroModule[nn.Linear](in_features, out_features)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([out_features, in_features])
                                        .to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([out_features]).to_event(1))

    def forward(self, x, y=None):
        sigma = self.sigma or pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Normal(mean, sigma), obs=y)


def data(n: int = 40, seed: int = 0):
    """(features [n, 3], y [n])."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, 3, generator=g)
    return f, f @ torch.tensor([1.0, -0.5, 0.3]) + 0.7 + 0.8 * torch.randn(n, generator=g)


def exact_log_evidence_given_sigma(features, y, sigma: float) -> float:
    """y ~ N(0, sigma^2 I + F F^T + 100 11^T): w and b integrate out."""
    f, y = features.double(), y.double()
    cov = sigma**2 * torch.eye(len(y), dtype=torch.float64) + f @ f.T + 100.0
    return float(torch.distributions.MultivariateNormal(torch.zeros_like(y), cov).log_prob(y))


def exact_log_evidence(features, y, points: int = 20_001) -> float:
    f, y = features.double(), y.double()
    sigma = torch.linspace(0, 10, points, dtype=torch.float64)[1:]
    base = f @ f.T + 100.0
    cov = base + sigma[:, None, None] ** 2 * torch.eye(len(y), dtype=torch.float64)
    log_lik = torch.distributions.MultivariateNormal(torch.zeros_like(y), cov).log_prob(y)
    h = float(sigma[1] - sigma[0])
    # Trapezoid rule in sigma with the Uniform(0, 10) density 1/10; the integrand vanishes at 0.
    weights = torch.full_like(sigma, h)
    weights[-1] = h / 2
    return float(torch.logsumexp(log_lik + torch.log(weights / 10), 0))
