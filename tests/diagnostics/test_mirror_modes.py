"""Mixtures whose components are exchangeable (Pyro's Gaussian-mixture tutorial): the program's
symmetry found on the guide's draws, the log K! bound said, and the mode-averaged estimate
checked against exact sums over every assignment of points to components."""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import config_enumerate
from pyro.ops.indexing import Vindex

from elbogap import evaluate

PRIOR_SCALE = 10.0


def clusters(sizes, centres, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(n, generator=g) + c for n, c in zip(sizes, centres, strict=True)])


def exact_evidence(x, k, log_assignment):
    """log p(x) as the sum over all k^N assignments: given one, each component's n points are
    jointly N(0, I + s^2 11^T) (its loc integrated out), whose log-density is
    -n/2 log 2 pi - 1/2 log(1 + n s^2) - 1/2 (sum x^2 - s^2 (sum x)^2 / (1 + n s^2))."""
    x, s2 = x.double(), PRIOR_SCALE ** 2
    terms = []
    for assignment in itertools.product(range(k), repeat=len(x)):
        a = torch.tensor(assignment)
        lp = log_assignment(a)
        for c in range(k):
            xs = x[a == c]
            n = len(xs)
            lp += float(-n / 2 * math.log(2 * math.pi) - 0.5 * math.log(1 + n * s2)
                        - 0.5 * ((xs ** 2).sum() - s2 * xs.sum() ** 2 / (1 + n * s2)))
        terms.append(lp)
    return float(torch.logsumexp(torch.tensor(terms, dtype=torch.float64), 0))


def one_mode_guide(x, sizes, scale=1.0):
    """q(locs): each component near one cluster's posterior, in one of the mirror modes."""
    bounds = [0, *itertools.accumulate(sizes)]
    n = torch.tensor(sizes, dtype=torch.float32)
    means = torch.stack([x[a:b].sum() for a, b in zip(bounds, bounds[1:], strict=False)]) / (n + 0.01)

    def guide(data):
        with pyro.plate("components", len(sizes)):
            pyro.sample("locs", dist.Normal(means, scale / (n + 0.01).sqrt()))
    return guide


def test_two_exchangeable_components_miss_log_2_and_the_mode_average_does_not():
    sizes = (5, 5)
    x = clusters(sizes, (-5.0, 5.0))

    @config_enumerate
    def model(data):
        with pyro.plate("components", 2):
            locs = pyro.sample("locs", dist.Normal(0.0, PRIOR_SCALE))
        with pyro.plate("data", len(data)):
            a = pyro.sample("assignment", dist.Categorical(torch.tensor([0.5, 0.5])))
            pyro.sample("obs", dist.Normal(Vindex(locs)[..., a], 1.0), obs=data)

    exact = exact_evidence(x, 2, lambda a: len(a) * math.log(0.5))
    d = evaluate(model, one_mode_guide(x, sizes), x, num_samples=300)
    t, mirror = d.total, d.mirror_modes
    se = t.log_evidence_se
    # One of two well separated modes: log 2 low, and k-hat sees nothing wrong.
    assert abs(t.log_evidence - (exact - math.log(2))) < 4 * se + 0.01
    assert mirror["mirror_modes"] == 2 and abs(mirror["log_bound"] - math.log(2)) < 1e-12
    averaged = mirror["mode_averaged"]
    assert abs(averaged["log_evidence"] - exact) < 4 * averaged["log_evidence_se"] + 0.01
    assert any("2! = 2 mirror modes" in note for note in d.notes)


def test_the_tutorials_mixture_with_dirichlet_weights_permutes_them_with_the_components():
    """weights ~ Dirichlet(0.5), locs_k ~ N(0, 10^2), assignment_n ~ Categorical(weights)
    summed out: permuting locs alone changes log p(x, z); with the weights it does not.  The
    exact evidence sums the Dirichlet-multinomial of each assignment."""
    sizes = (3, 2, 2)
    x = clusters(sizes, (-6.0, 0.0, 6.0), seed=3)
    alpha = torch.full((3,), 0.5)

    @config_enumerate
    def model(data):
        weights = pyro.sample("weights", dist.Dirichlet(alpha))
        with pyro.plate("components", 3):
            locs = pyro.sample("locs", dist.Normal(0.0, PRIOR_SCALE))
        with pyro.plate("data", len(data)):
            a = pyro.sample("assignment", dist.Categorical(weights))
            pyro.sample("obs", dist.Normal(Vindex(locs)[..., a], 1.0), obs=data)

    locs_guide = one_mode_guide(x, sizes)

    def guide(data):
        pyro.sample("weights", dist.Dirichlet(alpha + torch.tensor(sizes, dtype=torch.float32)))
        locs_guide(data)

    def log_dirichlet_multinomial(a):
        counts = torch.bincount(a, minlength=3).double()
        a0 = alpha.double()
        return float(torch.lgamma(a0.sum()) - torch.lgamma(a0.sum() + len(a))
                     + (torch.lgamma(a0 + counts) - torch.lgamma(a0)).sum())

    exact = exact_evidence(x, 3, log_dirichlet_multinomial)
    d = evaluate(model, guide, x, num_samples=400)
    mirror = d.mirror_modes
    assert mirror["mirror_modes"] == 6
    assert any("sites ['locs', 'weights']" in note for note in d.notes)
    averaged = mirror["mode_averaged"]
    assert abs(averaged["log_evidence"] - exact) < 4 * averaged["log_evidence_se"] + 0.02
    # The guide's own estimate sits near one mode of six: about log 6 low.
    assert d.total.log_evidence < exact - 1.0


def test_components_the_program_tells_apart_claim_no_symmetry():
    """Components with their own prior means are no mirror images of each other."""
    sizes = (5, 5)
    x = clusters(sizes, (-5.0, 5.0))

    @config_enumerate
    def model(data):
        with pyro.plate("components", 2):
            locs = pyro.sample("locs", dist.Normal(torch.tensor([-5.0, 5.0]), 2.0))
        with pyro.plate("data", len(data)):
            a = pyro.sample("assignment", dist.Categorical(torch.tensor([0.5, 0.5])))
            pyro.sample("obs", dist.Normal(Vindex(locs)[..., a], 1.0), obs=data)

    d = evaluate(model, one_mode_guide(x, sizes), x, num_samples=50)
    # (Another note may name this file, test_mirror_modes.py, as where vmap stopped.)
    assert d.mirror_modes is None and not any("mirror modes" in note for note in d.notes)
