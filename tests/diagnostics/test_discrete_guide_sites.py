"""Discrete latent sites sampled by the guide (an amortized Categorical, as under Pyro's
TraceGraph_ELBO or the semi-supervised VAE's q(y | x)): reconstruction and KL over the same
distribution, per-point SEs of 0 only where the number is exact, and a mean of the site that
exists.  Checked against sums over the site's values."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from elbogap import ConventionError, evaluate

LOCS = torch.tensor([-3.0, 0.0, 3.0])
PRIOR = torch.full((3,), 1 / 3)


def data():
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(20, generator=g) + c for c in (-3.0, 0.0, 3.0)])


def encoder(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 3))


def mixture(x):
    """k_n ~ Categorical(1/3), x_n ~ N(locs[k_n], 1)."""
    with pyro.plate("data", len(x)):
        k = pyro.sample("k", dist.Categorical(PRIOR))
        pyro.sample("x", dist.Normal(LOCS[k], 1.0), obs=x)


def amortized_guide(net):
    def guide(x):
        pyro.module("encoder", net)
        with pyro.plate("data", len(x)):
            pyro.sample("k", dist.Categorical(logits=net(x.unsqueeze(-1))))
    return guide


def test_a_categorical_guide_site_gives_the_exact_elbo_and_evidence_per_point():
    """Sharp q(k | x): most of K = 20 draws land on one value, which drew a Monte Carlo
    reconstruction beside an exact KL apart by the rare values' share, with an SE of 0."""
    x, net = data(), encoder()
    with torch.no_grad():
        net[2].weight.mul_(4.0)  # sharp q: every draw of most points on one value
    d = evaluate(mixture, amortized_guide(net), x, num_samples=20)
    with torch.no_grad():
        q = dist.Categorical(logits=net(x.unsqueeze(-1))).probs.double()
    log_joint = (dist.Normal(LOCS, 1.0).log_prob(x.unsqueeze(-1)) + PRIOR.log()).double()
    elbo = (q * (log_joint - q.log())).sum(-1)
    assert torch.allclose(d.elbo, elbo, atol=1e-4)
    assert torch.allclose(d.log_evidence, torch.logsumexp(log_joint, -1), atol=1e-4)
    assert torch.allclose(d.kl_prior, (q * (q.log() - PRIOR.log().double())).sum(-1), atol=1e-5)
    assert d.kl_method["k"] == "enumerated"
    assert d.elbo_se.abs().max() < 1e-6  # exact, so 0, and right to be
    # E_q[k | x] is the probabilities' mean over 0, 1, 2 (torch's Categorical.mean is NaN).
    assert torch.allclose(d.latent_mean["k"][:, 0].double(),
                          (q * torch.arange(3.0, dtype=torch.float64)).sum(-1), atol=1e-5)
    assert d.summary()["active_units"]["active"] == 1


def test_a_continuous_site_drawn_given_the_discrete_one_is_exact_too():
    """k ~ Cat(1/3), z ~ N(locs[k], 1), x ~ N(z, 1); q(k | x) an encoder's, q(z | k, x) the
    exact conditional N((locs[k] + x) / 2, 1/2): every value's weight is p(x, k) / q(k | x), so
    ELBO and log p(x) are the sums over k, whatever the draws of z."""
    x, net = data(), encoder(2)

    def model(x):
        with pyro.plate("data", len(x)):
            k = pyro.sample("k", dist.Categorical(PRIOR))
            z = pyro.sample("z", dist.Normal(LOCS[k], 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.module("encoder", net)
        with pyro.plate("data", len(x)):
            k = pyro.sample("k", dist.Categorical(logits=net(x.unsqueeze(-1))))
            pyro.sample("z", dist.Normal((LOCS[k] + x) / 2, 0.5 ** 0.5))

    d = evaluate(model, guide, x, num_samples=30)
    with torch.no_grad():
        q = dist.Categorical(logits=net(x.unsqueeze(-1))).probs.double()
    log_joint = (dist.Normal(LOCS, 2.0 ** 0.5).log_prob(x.unsqueeze(-1)) + PRIOR.log()).double()
    assert torch.allclose(d.elbo, (q * (log_joint - q.log())).sum(-1), atol=1e-4)
    assert torch.allclose(d.log_evidence, torch.logsumexp(log_joint, -1), atol=1e-4)
    assert d.kl_method["k"] == "enumerated"


def test_too_many_values_are_monte_carlo_in_both_terms_with_their_se():
    """Three 5-valued sites per point (125 combinations): both ELBO terms over the same draws,
    each point's ELBO within 4 of its SEs of the exact sum over values."""
    x = data()[::3]
    locs = torch.linspace(-2.0, 2.0, 5)

    def model(x):
        with pyro.plate("data", len(x)):
            a = pyro.sample("a", dist.Categorical(torch.full((5,), 0.2)))
            b = pyro.sample("b", dist.Categorical(torch.full((5,), 0.2)))
            c = pyro.sample("c", dist.Categorical(torch.full((5,), 0.2)))
            pyro.sample("x", dist.Normal(locs[a] + locs[b] - locs[c], 1.0), obs=x)

    logits = torch.tensor([2.0, 0.5, 0.0, -0.5, -1.0])

    def guide(x):
        with pyro.plate("data", len(x)):
            for name in "abc":
                pyro.sample(name, dist.Categorical(logits=logits.expand(len(x), 5)))

    d = evaluate(model, guide, x, num_samples=400)
    q = torch.softmax(logits, 0).double()
    grid = torch.cartesian_prod(*(torch.arange(5),) * 3)
    mean = locs[grid[:, 0]] + locs[grid[:, 1]] - locs[grid[:, 2]]
    log_q = q.log()[grid].sum(-1)
    log_joint = dist.Normal(mean, 1.0).log_prob(x.unsqueeze(-1)).double() + 3 * torch.log(
        torch.tensor(0.2, dtype=torch.float64))
    elbo = (log_q.exp() * (log_joint - log_q)).sum(-1)
    assert (d.elbo_se > 0).all()
    assert ((d.elbo - elbo).abs() < 4 * d.elbo_se).all()
    assert {d.kl_method[n] for n in "abc"} == {"monte-carlo"}
    assert any("more than 64" in note for note in d.notes)


def test_defensive_sampling_is_refused_where_the_discrete_site_is_summed_over():
    with pytest.raises(ConventionError, match="summed over"):
        evaluate(mixture, amortized_guide(encoder()), data(), num_samples=10, defensive=0.2)


def test_a_masked_point_weights_its_values_by_q_not_uniformly():
    """poutine.mask drops a point's k from log p and log q, but k is still drawn from q and
    read by the observation: that point's ELBO is E_q[log p(x_n | k)], weighted by q."""
    x, net = data(), encoder(3)
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[::4] = False

    def model(x):
        with pyro.plate("data", len(x)):
            with pyro.poutine.mask(mask=keep):
                k = pyro.sample("k", dist.Categorical(PRIOR))
            pyro.sample("x", dist.Normal(LOCS[k], 1.0), obs=x)

    def guide(x):
        pyro.module("encoder", net)
        with pyro.plate("data", len(x)), pyro.poutine.mask(mask=keep):
            pyro.sample("k", dist.Categorical(logits=net(x.unsqueeze(-1))))

    d = evaluate(model, guide, x, num_samples=10)
    with torch.no_grad():
        q = dist.Categorical(logits=net(x.unsqueeze(-1))).probs.double()
    likelihood = dist.Normal(LOCS, 1.0).log_prob(x.unsqueeze(-1)).double()
    masked = ~keep
    assert torch.allclose(d.elbo[masked], (q * likelihood).sum(-1)[masked], atol=1e-4)
    assert torch.allclose(d.log_evidence[masked],
                          torch.logsumexp(q.log() + likelihood, -1)[masked], atol=1e-4)
