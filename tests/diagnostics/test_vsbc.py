"""VSBC (Yao et al. 2018) of a guide fitted to one data set: on Pyro's Bayesian regression
tutorial pair with AutoNormal, the statistic equals Yao et al.'s definition computed by hand,
the guide's parameters come back as they were, and a guide that cannot follow the data (its
refit moves nothing) is found biased, on the right side."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from elbogap import ConventionError
from elbogap.diagnostics.vsbc import vsbc
from tests.real_programs import bayesian_regression


def test_vsbc_of_the_regression_tutorial_is_yao_et_als_statistic_and_leaves_the_guide_as_it_was():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    features, y = bayesian_regression.data(30)
    model = bayesian_regression.BayesianRegression(sigma=0.8)
    guide = AutoNormal(model)
    guide(features, y)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    result = vsbc(model, guide, features, y, num_simulations=24, num_steps=150,
                  num_draws=200, lr=0.05, seed=0)
    after = dict(pyro.get_param_store().items())
    assert all(torch.equal(before[k], after[k].detach()) for k in before)
    p = result.probabilities["linear.weight"]
    assert p.shape == (24, 3) and set(result.probabilities) == {"linear.weight", "linear.bias"}
    for d in range(3):
        # Yao et al.: the largest distance between the empirical distributions of p and 1 - p.
        a, b = np.sort(p[:, d].numpy()), np.sort(1 - p[:, d].numpy())
        grid = np.concatenate([a, b])
        by_hand = np.abs(np.searchsorted(a, grid, side="right") / len(a)
                         - np.searchsorted(b, grid, side="right") / len(b)).max()
        assert float(result.ks_stat["linear.weight"][d]) == pytest.approx(by_hand)
    summary = result.summary()
    assert summary["num_simulations"] == 24 and summary["seconds_per_refit"] > 0
    # Mean-field Gaussian marginals of a Gaussian posterior are centred: p symmetric about 1/2.
    assert summary["miscalibrated"] == []


def test_a_guide_whose_refit_cannot_follow_the_data_is_biased_on_its_side():
    pyro.clear_param_store()
    x = torch.zeros(20)

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        # A scale it can refit, and a mean stuck at -2: below nearly every simulated mu.
        scale = pyro.param("scale", torch.tensor(0.3), constraint=dist.constraints.positive)
        pyro.sample("mu", dist.Normal(-2.0, scale))

    result = vsbc(model, guide, x, num_simulations=40, num_steps=20, num_draws=100, seed=0)
    assert result.verdict("mu") == ["biased low"]


def test_a_guide_without_parameters_is_refused():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    with pytest.raises(ConventionError, match="no parameters"):
        vsbc(model, lambda x: pyro.sample("mu", dist.Normal(0.0, 1.0)), torch.zeros(3),
             num_simulations=4, num_steps=2, num_draws=2)
