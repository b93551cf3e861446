"""Model/guide pairs that break the conventions are refused with the site and the reason."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from elbogap.diagnostics.evaluation import evaluate
from elbogap.foundations.errors import ConventionError


def model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)


def test_guide_with_the_wrong_shape_is_named():
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))

    with pytest.raises(ConventionError, match="site 'z': the guide samples shape \\(4, 2\\) but "
                                              "the model's distribution there has shape \\(4, 3\\)"):
        evaluate(model, guide, torch.randn(4, 1), num_samples=2)


def test_a_guide_that_crashes_is_reported_as_such():
    def guide(x):
        raise RuntimeError("shapes do not match")

    with pytest.raises(ConventionError, match="the guide failed when called on x of shape"):
        evaluate(model, guide, torch.randn(4, 1), num_samples=2)


