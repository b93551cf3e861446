"""Mirrors Pyro's Bayesian regression tutorial (Part I): ``PyroModule[nn.Linear]`` with
``PyroSample`` priors on its weight and bias, sigma ~ Uniform(0, 10), an ``AutoDiagonalNormal``
guide; every latent variable is global.

    w ~ Normal(0, 1)^(1x3),  b ~ Normal(0, 10),  sigma ~ Uniform(0, 10)
    y_n ~ Normal(w . f_n + b, sigma)                                  plate "data"

The tutorial's ``forward(x, y=None)`` takes two tensors; elbogap's convention is one data tensor,
so ``RegressionData`` holds the features in columns 0..2 and y in column 3 and hands them on.
``nn.Linear`` does not broadcast over a leading particle dimension of its weight (F.linear
needs a matrix), so elbogap evaluates this pair one particle at a time.
Exact evidence: given sigma, y ~ N(0, sigma^2 I + F F^T + 100 11^T); sigma by quadrature.
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from torch import nn


class BayesianRegression(PyroModule):
    def __init__(self, in_features: int = 3, out_features: int = 1):
        super().__init__()
        self.linear = PyroModule[nn.Linear](in_features, out_features)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([out_features, in_features])
                                        .to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([out_features]).to_event(1))

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Normal(mean, sigma), obs=y)


class RegressionData(PyroModule):
    """``model(data)`` for the one-tensor convention: features, then y in the last column."""

    def __init__(self, regression: BayesianRegression):
        super().__init__()
        self.regression = regression

    def forward(self, data):
        return self.regression(data[:, :-1], data[:, -1])


def data(n: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, 3, generator=g)
    y = f @ torch.tensor([1.0, -0.5, 0.3]) + 0.7 + 0.8 * torch.randn(n, generator=g)
    return torch.cat([f, y[:, None]], dim=1)


def exact_log_evidence(d, points: int = 20_001) -> float:
    f, y = d[:, :-1].double(), d[:, -1].double()
    sigma = torch.linspace(0, 10, points, dtype=torch.float64)[1:]
    base = f @ f.T + 100.0
    cov = base + sigma[:, None, None] ** 2 * torch.eye(len(y), dtype=torch.float64)
    log_lik = torch.distributions.MultivariateNormal(torch.zeros_like(y), cov).log_prob(y)
    h = float(sigma[1] - sigma[0])
    # Trapezoid rule in sigma with the Uniform(0, 10) density 1/10; the integrand vanishes at 0.
    weights = torch.full_like(sigma, h)
    weights[-1] = h / 2
    return float(torch.logsumexp(log_lik + torch.log(weights / 10), 0))
