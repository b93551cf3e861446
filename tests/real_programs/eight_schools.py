"""Mirrors Pyro's examples/eight_schools/svi.py: the non-centred eight schools model and its
hand-written guide (log-normal tau through an ExpTransform), with no plate at all.

    mu ~ Normal(0, 10),  tau ~ HalfCauchy(25),  eta_j ~ Normal(0, 1)
    y_j ~ Normal(mu + tau eta_j, sigma_j)                      data: column 0 y, column 1 sigma

With no data plate every site is global and the unit is the data set (the eight schools).
One change: the original's guide samples eta with shape (J, 1) against the model's (J,), which
silently broadcasts theta to J x J inside Pyro; elbogap refuses that shape (a test shows it), so
the guide here uses shape (J,).  Exact evidence: eta and mu integrate out in closed form,
y ~ N(0, diag(sigma^2 + tau^2) + 100 11^T), and tau by quadrature.
"""

import math

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints, transforms

Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
DATA = torch.stack([Y, SIGMA], dim=1)


def model(data):
    y, sigma = data[:, 0], data[:, 1]
    j = data.shape[0]
    eta = pyro.sample("eta", dist.Normal(torch.zeros(j), torch.ones(j)).to_event(1))
    mu = pyro.sample("mu", dist.Normal(torch.zeros(1), 10 * torch.ones(1)).to_event(1))
    tau = pyro.sample("tau", dist.HalfCauchy(scale=25 * torch.ones(1)).to_event(1))
    theta = mu + tau * eta
    pyro.sample("obs", dist.Normal(theta, sigma).to_event(1), obs=y)


def guide(data, eta_shape=None):
    j = data.shape[0]
    shape = eta_shape or (j,)
    m_eta = pyro.param("loc_eta", torch.zeros(shape))
    s_eta = pyro.param("scale_eta", 0.5 * torch.ones(shape), constraint=constraints.positive)
    m_mu = pyro.param("loc_mu", torch.zeros(1))
    s_mu = pyro.param("scale_mu", torch.ones(1), constraint=constraints.positive)
    m_logtau = pyro.param("loc_logtau", torch.ones(1))
    s_logtau = pyro.param("scale_logtau", 0.5 * torch.ones(1), constraint=constraints.positive)
    pyro.sample("eta", dist.Normal(m_eta, s_eta).to_event(len(shape)))
    pyro.sample("mu", dist.Normal(m_mu, s_mu).to_event(1))
    pyro.sample("tau", dist.TransformedDistribution(
        dist.Normal(m_logtau, s_logtau), transforms.ExpTransform()).to_event(1))


def guide_with_original_eta_shape(data):
    guide(data, eta_shape=(data.shape[0], 1))


def exact_log_evidence(data=DATA, points: int = 200_001) -> float:
    """log p(y) = log int_0^1 p(y | tau(u)) du with tau = 25 tan(pi u / 2) (u uniform under the
    half-Cauchy); Simpson's rule over u."""
    y, sigma = data[:, 0].double(), data[:, 1].double()
    u = torch.linspace(0, 1, points, dtype=torch.float64)[1:-1]
    tau = 25 * torch.tan(math.pi * u / 2)
    cov = torch.diag_embed(sigma**2 + tau[:, None] ** 2) + 100.0
    log_lik = torch.distributions.MultivariateNormal(torch.zeros_like(y), cov).log_prob(y)
    h = u[1] - u[0]
    weights = torch.ones_like(u)
    weights[1::2], weights[2:-1:2] = 4, 2
    # The end points (u = 0, 1) carry no mass: p(y | tau) -> 0 as tau -> inf, and the
    # tau = 0 end is one point of a smooth integrand.
    return float(torch.logsumexp(log_lik + torch.log(weights * h / 3), 0))
