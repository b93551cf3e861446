"""Whether to believe the evidence: Pareto k-hat, ESS; where the gap goes: active units,
approximation and amortization gaps.  Checked against known answers."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from elbogap.diagnostics.amortization import decompose_gap, fit_local_guide, normal_sites
from elbogap.diagnostics.evaluation import evaluate
from elbogap.diagnostics.local_guide import LocalMeanFieldGuide, LocalSite
from elbogap.foundations.psis import importance_ess, khat_summary, pareto_khat
from elbogap.guides.linear import LinearEncoderGuide, OptimalMeanFieldGuide
from elbogap.models.linear_gaussian import LinearGaussian
from tests.diagnostics.test_linear_gaussian import draw, random_model


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("variance", [1.5, 2.0, 9.0])
def test_khat_of_normal_proposal_for_wider_normal_target(variance):
    """q = N(0,1), p = N(0, s^2): w ~ exp(z^2 (1 - 1/s^2) / 2) has Pareto tail k = 1 - 1/s^2.

    The tail is Pareto only asymptotically (a slowly varying factor 1/sqrt(log t)), so even at
    K = 10^6 the estimate sits a few hundredths low; 8/9 for s = 3 is the issue's example.
    """
    torch.manual_seed(0)
    q = torch.distributions.Normal(0.0, 1.0)
    p = torch.distributions.Normal(0.0, math.sqrt(variance))
    z = q.sample((10**6, 4))
    khat = pareto_khat(p.log_prob(z) - q.log_prob(z))
    truth = 1 - 1 / variance
    assert truth - 0.08 < khat.mean().item() < truth + 0.02, khat


@pytest.mark.parametrize("k", [0.3, 0.6, 0.9])
def test_khat_of_exactly_pareto_weights(k):
    """w = U^(-k), U uniform, is generalized-Pareto with shape k exactly: no asymptotic bias.

    A sign slip between the ArviZ lines would fit the left tail and miss this by far.
    """
    torch.manual_seed(1)
    u = torch.rand(10**5, 8)
    khat = pareto_khat(-k * u.log())
    se = khat.std().item() / math.sqrt(khat.numel())
    assert abs(khat.mean().item() - k) < 4 * se, khat


def test_constant_weights_are_perfect_not_an_error():
    khat = pareto_khat(torch.full((100, 3), -2.5))
    assert torch.isinf(khat).all() and (khat < 0).all()
    assert "reliable" in khat_summary(khat)["verdict"]
    torch.testing.assert_close(importance_ess(torch.zeros(100, 3)), torch.full((3,), 100.0))


def test_ess_formula():
    log_w = torch.log(torch.tensor([[1.0], [1.0], [2.0]]))
    torch.testing.assert_close(importance_ess(log_w), torch.tensor([16.0 / 6.0]))


def test_khat_separates_a_good_guide_from_one_with_too_small_variances():
    torch.manual_seed(0)
    model = random_model()
    x = draw(model, 20)
    good = evaluate(model.model, OptimalMeanFieldGuide(model).guide, x, num_samples=4000)
    narrow = OptimalMeanFieldGuide(model, scale_factor=0.2)
    # Every point's weights here share one distribution, with k >= 0.96 (the tail exponent
    # is set by the smallest eigenvalue of 0.04 D^1/2 Lambda D^1/2).  Near k = 1 the estimator
    # scatters by about 0.1 per point even at K = 20000, so the check is on the bulk.
    bad = evaluate(model.model, narrow.guide, x, num_samples=20_000, batch_size=5)
    assert (good.khat < 0.5).all(), good.khat
    assert (bad.khat > 0.5).all() and bad.khat.median() > 0.85, bad.khat
    assert good.ess.min() > bad.ess.max()
    summary = bad.summary()["khat"]
    assert summary["share_unreliable"] >= 0.9
    assert summary["share_unstable"] == 0  # the weights of a too-narrow guide are far from equal
    assert "NOT reliable" in summary["verdict"] and "unstable" not in summary["verdict"]
    assert good.summary()["khat"]["share_good"] == 1.0


# Poisson counts with a Gamma prior: the posterior is Gamma(A + x, B + 1) and p(x) negative
# binomial, exactly.  The guide is the log-normal matching the posterior's moments in log z.
A, B = 3.0, 1.0


def poisson_gamma(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Gamma(torch.full(x.shape, A), B))
        pyro.sample("x", dist.Poisson(z), obs=x)


def log_normal_guide(x):
    a = A + x
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.LogNormal(torch.digamma(a) - math.log(B + 1),
                                        torch.polygamma(1, a).sqrt()))


def negative_binomial_log_evidence(x):
    return (torch.lgamma(x + A) - math.lgamma(A) - torch.lgamma(x + 1)
            + A * math.log(B / (B + 1)) - x * math.log(B + 1))


def test_khat_on_nearly_equal_weights_is_called_unstable_and_the_estimate_is_exact():
    """The log-normal's log-density in log z falls off quadratically, the Gamma's linearly: the
    weights are unbounded far in the left tail, a region K draws barely reach.  k-hat > 0.7 on
    almost every point, jumping with K, while ESS is ~95 % of K and log p(x) agrees with the
    negative binomial's to Monte Carlo error: "k-hat unstable", not "NOT reliable"."""
    torch.manual_seed(0)
    x = dist.Poisson(dist.Gamma(torch.full((200,), A), B).sample()).sample()
    exact = negative_binomial_log_evidence(x)
    medians = {}
    for k in (1000, 4000):
        pyro.set_rng_seed(1)
        d = evaluate(poisson_gamma, log_normal_guide, x, num_samples=k)
        difference = d.log_evidence - exact
        se = difference.std().item() / math.sqrt(len(x))
        assert abs(difference.mean().item()) < 3 * se, (difference.mean(), se)
        summary = d.summary()["khat"]
        assert summary["share_unstable"] > 0.8, summary
        assert "k-hat unstable" in summary["verdict"]
        medians[k] = d.khat.median().item()
    assert medians[1000] > 0.7 and medians[4000] > medians[1000] + 0.5, medians


def test_ais_beside_importance_reads_khats_warning_on_the_points_it_flags():
    from elbogap.diagnostics.ais import agreement_where_khat_high, ais_beside_importance

    torch.manual_seed(0)
    x = dist.Poisson(dist.Gamma(torch.full((40,), A), B).sample()).sample()
    both = ais_beside_importance(poisson_gamma, log_normal_guide, x, num_samples=1000,
                                 num_chains=8, num_steps=100, seed=0)
    assert both["where_khat_high"]["num_points"] >= 30
    assert "AIS agrees with importance sampling" in both["where_khat_high"]["reading"]
    # Where AIS sits above importance sampling beyond its error, k-hat was right.
    higher = agreement_where_khat_high(torch.tensor([0.5, 0.7, 0.6, 0.4]))
    assert "underestimates log p(x) there, as k-hat warned" in higher["reading"]
    lower = agreement_where_khat_high(torch.tensor([-0.5, -0.7, -0.6, -0.4]))
    assert "AIS has not converged there" in lower["reading"]


def test_active_units_against_a_model_that_ignores_one_dimension():
    """With W's last column zero, z_3 never reaches x: its posterior is the prior, E[z_3|x] = 0."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 3, generator=g)
    weight[:, 2] = 0
    model = LinearGaussian.from_parameters(weight, torch.randn(6, generator=g),
                                           torch.full((6,), 0.5))
    x = draw(model, 200)
    d = evaluate(model.model, OptimalMeanFieldGuide(model).guide, x, num_samples=30)
    assert d.active_units()["z"].tolist() == [True, True, False]
    # E_q[z | x] is the guide's mean: here the closed-form posterior mean.
    torch.testing.assert_close(d.latent_mean["z"], model.posterior(x)[0].double())
    summary = d.summary()["active_units"]
    assert summary["active"] == 2 and summary["total"] == 3 and summary["warning"] is None
    torch.testing.assert_close(d.kl_per_dim["z"][:, 2], torch.zeros(200), atol=1e-12, rtol=0)


def test_collapse_warning_when_most_units_are_inactive():
    model = LinearGaussian.from_parameters(torch.zeros(4, 3), torch.zeros(4), torch.ones(4))
    x = draw(model, 50)
    d = evaluate(model.model, OptimalMeanFieldGuide(model).guide, x, num_samples=30)
    warning = d.summary()["active_units"]["warning"]
    assert warning.startswith("posterior collapse: only 0 of 3")


@pytest.mark.slow
def test_gap_decomposition_against_closed_forms():
    """Untrained linear encoder: a large amortization gap; q* is the closed-form optimum."""
    torch.manual_seed(0)
    model = random_model()
    x = draw(model, 50)
    encoder = LinearEncoderGuide(5, 2)
    sites = {name: LocalSite(**s) for name, s in normal_sites(model.model, encoder.guide, x).items()}
    local = LocalMeanFieldGuide(sites)
    torch.testing.assert_close(local.locs["z"], encoder.encode(x)[0])  # starts at the encoder
    fit_local_guide(model.model, local.guide, local.parameters(), x, steps=1000)
    with torch.no_grad():
        at_local = model.exact_diagnostics(x, local.locs["z"], local.scale("z"))
        at_encoder = model.exact_diagnostics(x, *encoder.encode(x))
        at_optimum = model.exact_diagnostics(x, *model.optimal_mean_field(x))
    # SVI found the closed-form optimum q* to within 0.01 nats per point.
    assert (at_optimum["elbo"] - at_local["elbo"]).max() < 0.01
    gaps = decompose_gap(model.model, encoder.guide, x, local_guide=local.guide, num_samples=4000)
    exact_amortization = at_local["elbo"] - at_encoder["elbo"]
    exact_approximation = at_local["evidence_gap"]
    amortization_se = torch.hypot(gaps.local.elbo_se, gaps.amortized.elbo_se)
    assert ((gaps.amortization_gap - exact_amortization).abs() < 4 * amortization_se).all()
    # The approximation gap is tiny here (q* is nearly the posterior), and the standard error of
    # a variance-like quantity is itself noisy: checked as calibration over the 50 points (seeds
    # 10-12 gave mean z -0.02/-0.10/-0.20, spread 1.08/1.02/0.79, max |z| 2.6/3.4/3.1).
    z = (gaps.approximation_gap - exact_approximation) / gaps.local.evidence_gap_se
    assert abs(z.mean()) < 4 / math.sqrt(len(z)) and 0.5 < z.std() < 1.5 and z.abs().max() < 5
    assert gaps.amortization_gap.mean() > 1.0  # an untrained encoder is far from q*
    summary = gaps.summary()
    assert set(summary) >= {"approximation_gap", "amortization_gap", "log_evidence"}


def test_local_guide_of_a_pair_with_two_latent_sites():
    """The local guide enters each plate once per call, however many sites sit in it (it used
    to build plate 'data' once per site: 'Multiple sample sites named data')."""
    def model(x):
        with pyro.plate("data", x.shape[0]):
            a = pyro.sample("a", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            b = pyro.sample("b", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(torch.cat([a, b], -1), 0.5).to_event(1), obs=x)

    def guide(x):  # the prior: far from the posterior, so q* has a gap to close
        with pyro.plate("data", x.shape[0]):
            pyro.sample("a", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("b", dist.Normal(x.new_zeros(x.shape[0], 1), 1.0).to_event(1))

    x = torch.randn(6, 3)
    sites = {n: LocalSite(**s) for n, s in normal_sites(model, guide, x).items()}
    local = LocalMeanFieldGuide(sites)
    fit_local_guide(model, local.guide, local.parameters(), x, steps=300, lr=0.05)
    gaps = decompose_gap(model, guide, x, local_guide=local.guide, num_samples=2000)
    # The posterior is mean-field here (independent coordinates): q* closes the whole gap.
    assert float(gaps.approximation_gap.abs().max()) < 0.05
    assert float(gaps.amortization_gap.mean()) > 0.5
