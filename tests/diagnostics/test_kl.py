"""The analytic KL to the prior, and the ELBO's decomposition into reconstruction - KL."""

import math

import pyro
import torch
from pyro import poutine

from elbogap.diagnostics.evaluation import evaluate
from elbogap.diagnostics.kl import ANALYTIC, MONTE_CARLO, kl_to_prior
from elbogap.guides.mean_field import MeanFieldGuide
from elbogap.models.vae import VAE


def make_vae(data_dim=16, latent_dim=4):
    return VAE(data_dim, latent_dim, (32,)), MeanFieldGuide(data_dim, latent_dim, (32,))


def test_kl_of_diagonal_normal_to_standard_normal_is_closed_form():
    vae, enc = make_vae()
    x = torch.bernoulli(torch.full((40, 16), 0.4))
    d = evaluate(vae.model, enc.guide, x, num_samples=3)
    loc, scale = enc.encode(x)
    closed = 0.5 * (scale**2 + loc**2 - 1 - 2 * scale.log())
    assert d.kl_method == {"z": ANALYTIC}
    torch.testing.assert_close(d.kl_per_dim["z"], closed.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d.kl_prior, closed.sum(-1).double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d.kl_sites["z"], d.kl_prior)


def test_kl_falls_back_to_monte_carlo_without_closed_form():
    q = pyro.distributions.Gamma(torch.tensor(2.0), torch.tensor(3.0))
    p = pyro.distributions.LogNormal(torch.tensor(0.0), torch.tensor(1.0))
    z = q.sample((200000,))
    kl = kl_to_prior(q, p, z)
    assert kl.method == MONTE_CARLO
    # The mean of the one-sample estimates is KL(q||p); checked against numerical integration.
    grid = torch.linspace(1e-4, 10, 200001, dtype=torch.float64)
    qd = pyro.distributions.Gamma(torch.tensor(2.0, dtype=torch.float64),
                                  torch.tensor(3.0, dtype=torch.float64))
    pd = pyro.distributions.LogNormal(torch.tensor(0.0, dtype=torch.float64),
                                      torch.tensor(1.0, dtype=torch.float64))
    integrand = qd.log_prob(grid).exp() * (qd.log_prob(grid) - pd.log_prob(grid))
    exact = torch.trapezoid(integrand, grid).item()
    se = kl.value.std().item() / math.sqrt(len(z))
    assert abs(kl.value.mean().item() - exact) < 4 * se


def test_reconstruction_minus_kl_matches_plain_monte_carlo_elbo():
    """evaluate's ELBO vs mean of log p(x,z) - log q(z); its reconstruction (the plain Monte
    Carlo mean) minus the analytic KL agrees with it within their Monte Carlo errors."""
    vae, enc = make_vae()
    x = torch.bernoulli(torch.full((30, 16), 0.4))
    d = evaluate(vae.model, enc.guide, x, num_samples=400)
    apart = (d.reconstruction - d.kl_prior - d.elbo).sum().item()
    assert apart != 0.0  # two estimators, not one number written twice
    se = (d.reconstruction_se.pow(2).sum() + d.elbo_se.pow(2).sum()).sqrt().item()
    assert abs(apart) < 4 * se
    draws = []
    with torch.no_grad():
        for _ in range(400):
            guide_trace = poutine.trace(enc.guide).get_trace(x)
            model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
            draws.append(model_trace.log_prob_sum().item() - guide_trace.log_prob_sum().item())
    draws = torch.tensor(draws, dtype=torch.float64)
    plain, plain_se = draws.mean().item(), draws.std().item() / math.sqrt(len(draws))
    ours, ours_se = d.elbo.sum().item(), d.elbo_se.pow(2).sum().sqrt().item()
    assert abs(plain - ours) < 4 * math.hypot(plain_se, ours_se)
