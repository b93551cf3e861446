"""The importance-weighted (Renyi) bound per data point, against closed forms and Pyro's own."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO

from elbogap import ConfigError, ConventionError, FitOptions, fit
from elbogap.data.dataset import Dataset
from elbogap.models.linear_gaussian import LinearGaussian
from elbogap.training.objectives import PerDatapointRenyiELBO


def setup(n=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    lg = LinearGaussian.from_parameters(torch.randn(6, 2, generator=g), torch.randn(6, generator=g),
                                        0.05 + 0.1 * torch.rand(6, generator=g))
    x = lg.sample(n, g)

    def guide(x):  # the posterior's diagonal, 4x too narrow: a gap IWAE can close
        mean, cov = lg.posterior(x)
        with pyro.plate("data", x.shape[0]):
            scale = (cov.diagonal().sqrt() / 2).expand_as(mean)
            pyro.sample("z", dist.Normal(mean.detach(), scale.detach()).to_event(1))

    return lg, guide, x


def bound(lg, guide, x, k, alpha=0.0, repeats=200):
    objective = PerDatapointRenyiELBO(num_particles=k, alpha=alpha)
    return -sum(objective.loss(lg.model, guide, x) for _ in range(repeats)) / repeats / len(x)


def test_iwae_per_point_rises_with_k_from_the_elbo_to_log_p():
    lg, guide, x = setup()
    exact = lg.log_evidence(x).double().mean().item()
    mean, cov = lg.posterior(x)
    elbo = exact - lg.kl_to_posterior(x, mean, cov.diagonal().sqrt() / 2).double().mean().item()
    bounds = [bound(lg, guide, x, k) for k in (1, 10, 100)]
    # K = 1 is the ELBO (Monte Carlo over 200 repeats x 20 points: SE well under 0.02).
    assert bounds[0] == pytest.approx(elbo, abs=0.03)
    assert bounds[0] < bounds[1] < bounds[2] <= exact + 0.01
    assert exact - bounds[2] < (exact - elbo) / 3


def test_agrees_with_pyros_renyi_elbo_where_every_site_is_in_the_data_plate():
    """Pyro 1.9's RenyiELBO keeps the plates common to every site (its get_dependent_plate_dims),
    so on a pair whose every site is in the data plate it is per point too: the two agree within
    Monte Carlo error. (pyro-ppl/pyro#3104's joint reduction happens where a site sits outside
    the plate; there the per-point bound does not exist, and ours refuses, below.)"""
    lg, guide, x = setup()
    repeats = 100
    ours = [PerDatapointRenyiELBO(10).loss(lg.model, guide, x) for _ in range(repeats)]
    pyros = [RenyiELBO(alpha=0.0, num_particles=10, vectorize_particles=True,
                       max_plate_nesting=1).loss(lg.model, guide, x) for _ in range(repeats)]
    a, b = torch.tensor(ours, dtype=torch.float64), torch.tensor(pyros, dtype=torch.float64)
    se = (a.var() / repeats + b.var() / repeats).sqrt()
    assert (a.mean() - b.mean()).abs() < 4 * se


def test_a_pair_with_a_global_latent_is_refused_not_bounded_jointly():
    def model(x):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(shift, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, 0.7))

    x = torch.randn(10)
    with pytest.raises(ConventionError, match="'shift'.*outside plate 'data'"):
        PerDatapointRenyiELBO(5).loss(model, guide, x)


def test_one_particle_is_trace_elbo_draw_for_draw():
    """K = 1: the bound is the ELBO itself; with the same draws its loss and gradient are
    Trace_ELBO's."""
    from pyro.infer import Trace_ELBO

    lg, guide, x = setup()
    shift = torch.zeros(2, requires_grad=True)

    def shifted(x):
        with pyro.plate("data", x.shape[0]):
            mean, cov = lg.posterior(x)
            pyro.sample("z", dist.Normal(mean.detach() + shift, cov.diagonal().sqrt()).to_event(1))

    ours = PerDatapointRenyiELBO(1)
    ours.loss(lg.model, shifted, x)  # its first call inspects the pair, drawing numbers
    losses, grads = [], []
    for loss in (ours, Trace_ELBO()):
        pyro.set_rng_seed(4)
        value = loss.differentiable_loss(lg.model, shifted, x)
        losses.append(value.item())
        grads.append(torch.autograd.grad(value, shift)[0])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_renyi_alpha_sits_between_iwae_and_the_elbo():
    lg, guide, x = setup()
    iwae, half, elbo = (bound(lg, guide, x, 10, alpha, repeats=100) for alpha in (0.0, 0.5, 5.0))
    assert iwae > half > elbo - 0.05
    with pytest.raises(ConfigError, match="^renyi_alpha "):
        PerDatapointRenyiELBO(5, alpha=1.0)


def test_fit_trains_with_the_per_point_bound():
    g = torch.Generator().manual_seed(0)
    truth = LinearGaussian.from_parameters(torch.randn(6, 2, generator=g), torch.zeros(6),
                                           torch.full((6,), 0.2))
    x = truth.sample(300, g)
    data = Dataset("lg", x[:240], x[240:], None, "gaussian")
    model = LinearGaussian(6, 2)
    from elbogap.guides.linear import LinearEncoderGuide

    guide = LinearEncoderGuide(6, 2)
    result = fit(model.model, guide.guide, data,
                 FitOptions(epochs=15, batch_size=40, lr=0.02, elbo="iwae", num_particles=5,
                            eval_every=15, eval_samples=10, progress=False))
    first, last = result.history[0]["train_objective"], result.history[-1]["train_objective"]
    assert last > first and math.isfinite(last)
    # Not the ELBO, so not recorded as one.
    assert all(r["train_elbo"] is None for r in result.history)
    # The training objective is the IWAE bound; the recorded diagnostics are the true ELBO's.
    assert result.history[-1]["diagnostics"]["elbo"]["mean"] < last + 0.5
    with pytest.raises(ConfigError, match="^renyi_alpha "):
        FitOptions(elbo="iwae", renyi_alpha=-1).check(100)
