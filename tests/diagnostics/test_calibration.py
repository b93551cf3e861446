"""Amortized simulation-based calibration against exact answers: a linear-Gaussian model whose
posterior is known, with its exact posterior as the guide (the checks pass at their nominal
rate), and with that guide made too narrow, too wide or shifted in one coordinate (flagged,
with the direction and the coordinate named)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from elbogap import ConventionError, OptionError
from elbogap.diagnostics.calibration import calibration

# x_n = A z_n + noise, z_n ~ N(0, I_2), noise ~ N(0, I_3); A's columns orthogonal, so the
# posterior is diagonal: Sigma = diag(1/2, 1/5), mu = Sigma A^T x.
A = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
POST_VAR = torch.tensor([0.5, 0.2])


def model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ A.T, 1.0).to_event(1), obs=x)


def posterior_guide(scale=1.0, shift=(0.0, 0.0)):
    """The exact posterior, its scale multiplied by ``scale``, its mean moved by ``shift``
    posterior standard deviations."""
    sd = POST_VAR.sqrt()

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            loc = POST_VAR * (x @ A) + torch.tensor(shift) * sd
            pyro.sample("z", dist.Normal(loc, scale * sd).to_event(1))
    return guide


X = torch.zeros(100, 3)  # shapes only: calibration simulates its own points


def test_the_exact_posterior_is_calibrated_at_the_nominal_rate():
    runs, flagged, small = 30, 0, 0
    for seed in range(runs):
        c = calibration(model, posterior_guide(), X, num_simulations=200, seed=seed)
        assert c.ranks["z"].shape == (200, 2)
        flagged += bool(c.summary()["miscalibrated"])
        small += int((c.p_value["z"] < 0.05).sum())
    # Holm keeps the family-wise rate at or below 5 %: P(>= 6 of 30 | p = 0.05) < 0.003.
    assert flagged <= 5
    # Uncorrected, about 5 % of the 60 coordinates: P(>= 10 | p = 0.05) < 0.002.
    assert small <= 9


@pytest.mark.parametrize("guide, expected", [
    (posterior_guide(scale=0.5), ["too narrow", "too narrow"]),
    (posterior_guide(scale=2.0), ["too wide", "too wide"]),
    (posterior_guide(shift=(0.0, 0.6)), ["calibrated", "shifted high"]),
    (posterior_guide(shift=(-0.6, 0.0)), ["shifted low", "calibrated"]),
])
def test_a_miscalibrated_guide_is_flagged_with_its_direction_and_coordinate(guide, expected):
    # At level 0.01 the untouched coordinate is a false alarm 1 time in 100 (fixed seed here).
    c = calibration(model, guide, X, num_simulations=400, seed=0, level=0.01)
    assert c.verdict("z") == expected
    named = c.summary()["miscalibrated"]
    assert named == [f"z[{d}]: {v}" for d, v in enumerate(expected) if v != "calibrated"]


def test_what_calibration_cannot_take_is_refused_with_the_reason():
    def global_model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu * torch.ones(3), 1.0).to_event(1), obs=x)

    def global_guide(x):
        pyro.sample("mu", dist.Normal(0.1, 0.5))

    with pytest.raises(ConventionError, match="outside the data plate.*elbogap.vsbc"):
        calibration(global_model, global_guide, X, num_simulations=200)

    def unconditioned_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    with pytest.raises(ConventionError, match="not conditioned on x"):
        calibration(model, unconditioned_guide, X, num_simulations=200)

    def improper_model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.ImproperUniform(dist.constraints.real, (), (2,)))
            pyro.sample("x", dist.Normal(z @ A.T, 1.0).to_event(1), obs=x)

    with pytest.raises(ConventionError, match="prior"):
        calibration(improper_model, posterior_guide(), X, num_simulations=200)
    def param_model(x):
        loc = pyro.param("loc", torch.zeros(3))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    with pytest.raises(ConventionError, match="no latent sample site"):
        calibration(param_model, lambda x: None, X, num_simulations=200)
    with pytest.raises(OptionError, match="bins"):
        calibration(model, posterior_guide(), X, num_draws=100, bins=20)
    with pytest.raises(OptionError, match="num_simulations"):
        calibration(model, posterior_guide(), X, num_simulations=50)


def test_the_ecdf_band_holds_uniform_ranks_at_its_level_and_the_plots_draw_the_worst_first():
    from elbogap.foundations.ecdf_band import ecdf_difference_band, outside_band

    z, lower, upper = ecdf_difference_band(200, 100)
    g = torch.Generator().manual_seed(7)
    misses = sum(outside_band((torch.randint(0, 100, (200,), generator=g).double() + 0.5) / 100,
                              z, lower, upper) for _ in range(1000))
    # 5 % nominal: SE over 1000 samples ~ 0.7 %, and the band's gamma is itself simulated.
    assert 0.025 < misses / 1000 < 0.08
    c = calibration(model, posterior_guide(shift=(0.0, 0.6)), X, num_simulations=400, seed=0)
    assert c.worst(2) == [("z", 1), ("z", 0)]
    for fig in (c.plot_ranks(), c.plot_ecdf()):
        titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
        assert titles[0].startswith("z[1]: shifted high") and titles[1].startswith("z[0]")
    narrow = calibration(model, posterior_guide(scale=0.5), X, num_simulations=400, seed=0)
    z, lower, upper = ecdf_difference_band(400, 100)
    u = (narrow.ranks["z"][:, 0].double() + 0.5) / 100
    assert outside_band(u, z, lower, upper)
