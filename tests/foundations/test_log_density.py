"""The fast Bernoulli log-density equals Pyro's, and leaves every other distribution to Pyro."""

import pyro.distributions as dist
import pytest
import torch

from elbogap.foundations.log_density import log_density


def reference(logits, value):
    """Pyro's log_prob in float64: the exact answer both float32 versions are compared with."""
    fn = dist.Bernoulli(logits=logits.double(), validate_args=False).to_event(1)
    return fn.log_prob(value.double())


@pytest.mark.parametrize("grey", [False, True])
def test_bernoulli_logits_match_pyro_within_float32_rounding(grey):
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(30, 20, 784, generator=g)
    x = torch.rand(20, 784, generator=g) if grey else torch.bernoulli(torch.full((20, 784), 0.2), generator=g)
    # Grey values are outside the support; some users feed them all the same.
    fn = dist.Bernoulli(logits=logits, validate_args=False).to_event(1)
    exact = reference(logits, x)
    ours = log_density(fn, x)
    pyros = fn.log_prob(x)
    assert ours.shape == pyros.shape == (30, 20)
    # Sums of 784 float32 terms of size ~4: rounding of a few 1e-4, for Pyro's formula as well.
    tolerance = 2 * (pyros.double() - exact).abs().max() + 1e-4
    assert (ours.double() - exact).abs().max() <= tolerance
    # The data as Pyro hands it over inside a particle plate: a broadcast (stride-0) view.
    expanded = x.expand(30, 20, 784)
    assert expanded.stride(0) == 0
    torch.testing.assert_close(log_density(fn, expanded), ours)


def test_probs_parametrization_takes_the_same_path():
    probs = torch.rand(5, 10).clamp(0.01, 0.99)
    x = torch.bernoulli(probs)
    fn = dist.Bernoulli(probs=probs).to_event(1)
    torch.testing.assert_close(log_density(fn, x), fn.log_prob(x), rtol=1e-5, atol=1e-4)


class TemperedBernoulli(dist.Bernoulli):
    def log_prob(self, value):
        return 0.5 * super().log_prob(value)


@pytest.mark.parametrize("fn", [
    TemperedBernoulli(logits=torch.randn(4, 6)).to_event(1),   # a subclass keeps its own log_prob
    dist.Bernoulli(logits=torch.randn(4, 2, 3)).to_event(2),   # two event dims: Pyro's path
    dist.Normal(torch.randn(4, 6), 1.0).to_event(1),
])
def test_other_distributions_use_their_own_log_prob(fn):
    value = fn.sample()
    assert torch.equal(log_density(fn, value), fn.log_prob(value))
