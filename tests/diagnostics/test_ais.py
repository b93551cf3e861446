"""Annealed importance sampling, BDMC and ELBO surgery against exact answers."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from elbogap import ConfigError, ConventionError, annealed_evidence, bdmc, elbo_surgery, evaluate
from elbogap.diagnostics.ais import sigmoid_schedule
from elbogap.models.linear_gaussian import LinearGaussian


def linear_gaussian(noise=(0.05, 0.1), n=20, data_dim=6, latent_dim=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    model = LinearGaussian.from_parameters(
        torch.randn(data_dim, latent_dim, generator=g), torch.randn(data_dim, generator=g),
        noise[0] + noise[1] * torch.rand(data_dim, generator=g))
    return model, model.sample(n, g)


def posterior_guide(lg, shrink=1.0, full=False):
    """q(z|x): the exact posterior (full covariance), or its diagonal with variances / shrink."""
    def guide(x):
        mean, cov = lg.posterior(x)
        mean, cov = mean.detach(), cov.detach()
        with pyro.plate("data", x.shape[0]):
            if full:
                pyro.sample("z", dist.MultivariateNormal(mean, cov))
            else:
                scale = cov.diagonal().sqrt() / math.sqrt(shrink)
                pyro.sample("z", dist.Normal(mean, scale.expand_as(mean)).to_event(1))
    return guide


def test_sigmoid_schedule_runs_from_0_to_1_increasing():
    betas = sigmoid_schedule(50)
    assert betas[0] == 0 and betas[-1] == 1 and (betas.diff() > 0).all()


def test_ais_is_exact_when_it_starts_at_the_posterior():
    """log p(x, z) - log q(z|x) = log p(x) for every z: every weight is exact."""
    lg, x = linear_gaussian()
    a = annealed_evidence(lg.model, posterior_guide(lg, full=True), x, num_chains=4, num_steps=5)
    assert torch.allclose(a.log_evidence.double(), lg.log_evidence(x).double(), atol=2e-3)
    assert a.gap.abs().max() < 2e-3


@pytest.mark.slow
def test_ais_matches_the_closed_form_where_importance_sampling_fails():
    """A guide with variances 20x too small: importance sampling at K = 1000 misses log p(x) by
    most of a nat with k-hat > 0.9; AIS lands within its standard error."""
    lg, x = linear_gaussian()
    guide = posterior_guide(lg, shrink=20.0)
    exact = lg.log_evidence(x).double()
    d = evaluate(lg.model, guide, x, num_samples=1000)
    assert (d.log_evidence.double() - exact).mean() < -0.5 and d.khat.median() > 0.9
    a = annealed_evidence(lg.model, guide, x, num_chains=16, num_steps=1000)
    diff = a.log_evidence.double() - exact
    # Monte Carlo SE of the mean over independent points.
    se = a.log_evidence_se.double().pow(2).sum().sqrt() / len(x)
    assert diff.mean().abs() < 3 * se + 0.01, (diff.mean(), se)
    assert 0.5 < a.acceptance.mean() < 1.0
    # The AIS gap estimates KL(q || p(z|x)), known exactly here.
    mean, cov = lg.posterior(x)
    exact_gap = lg.kl_to_posterior(x, mean, cov.diagonal(dim1=-2, dim2=-1).sqrt() / math.sqrt(20.0))
    assert (a.gap.double().mean() - exact_gap.double().mean()).abs() < 0.15


@pytest.mark.slow
def test_bdmc_brackets_the_exact_evidence_and_tightens_with_more_steps():
    lg, x_like = linear_gaussian(n=30)
    guide = posterior_guide(lg, shrink=20.0)
    brackets = []
    for steps in (10, 300):
        pyro.set_rng_seed(0)
        b = bdmc(lg.model, guide, x_like, num_chains=8, num_steps=steps)
        exact = lg.log_evidence(b.observations["x"]).double().mean().item()
        width = (b.upper - b.lower).double()
        se = width.std().item() / math.sqrt(len(width))
        assert b.lower.double().mean() <= exact + 3 * se and exact <= b.upper.double().mean() + 3 * se
        brackets.append(width.mean().item())
    assert brackets[1] < brackets[0] / 3, brackets


def test_ais_moves_constrained_latents_with_their_jacobian():
    """z_n ~ Gamma(2, 1), x_n ~ Poisson(z_n): p(x_n) is negative binomial; a log-normal guide
    proposes on (0, inf), AIS anneals on the log scale."""
    alpha, beta = 2.0, 1.0

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Gamma(torch.tensor(alpha), torch.tensor(beta)))
            pyro.sample("x", dist.Poisson(z), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.LogNormal((x + 1).log(), 0.3 * torch.ones_like(x)))

    x = torch.tensor([0.0, 1.0, 3.0, 7.0, 12.0])
    exact = (torch.lgamma(x + alpha) - math.lgamma(alpha) - torch.lgamma(x + 1)
             + alpha * math.log(beta / (1 + beta)) - x * math.log(1 + beta)).double()
    a = annealed_evidence(model, guide, x, num_chains=32, num_steps=300)
    diff = a.log_evidence.double() - exact
    assert (diff.abs() < 4 * a.log_evidence_se.double() + 0.02).all(), (diff, a.log_evidence_se)


def test_ais_refuses_what_it_cannot_anneal_and_takes_autoguides_from_either_start():
    """AutoNormal with parameters per point: its density is read through its auxiliary sites,
    so AIS starts from it (and gives its ELBO) as from the prior; both land on log p(x).  An
    AutoDelta has no density: refused, saying so."""
    from pyro.infer.autoguide import AutoDelta

    lg, x = linear_gaussian(noise=(0.5, 1.0), n=8)
    pyro.clear_param_store()
    auto = AutoNormal(lg.model)
    for start in ("guide", "prior"):
        a = annealed_evidence(lg.model, auto, x, num_chains=16, num_steps=200, start=start,
                              seed=0)
        assert (a.elbo is None) == (start == "prior")
        diff = a.log_evidence.double() - lg.log_evidence(x).double()
        assert (diff.abs() < 4 * a.log_evidence_se.double() + 0.05).all(), (diff, start)
    with pytest.raises(ConventionError, match="point mass"):
        annealed_evidence(lg.model, AutoDelta(lg.model), x, num_chains=2, num_steps=2)

    def discrete(x):
        with pyro.plate("data", x.shape[0]):
            k = pyro.sample("k", dist.Bernoulli(0.5))
            means = k.unsqueeze(-1).expand(k.shape + x.shape[-1:])
            pyro.sample("x", dist.Normal(means, 1.0).to_event(1), obs=x)

    def discrete_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("k", dist.Bernoulli(0.5))

    with pytest.raises(ConventionError, match="discrete"):
        annealed_evidence(discrete, discrete_guide, x, num_chains=2, num_steps=2)


def test_elbo_surgery_splits_the_kl_and_matches_the_mutual_information():
    """With q the exact posterior, the aggregate posterior is p(z) up to sampling: the mutual
    information is I(x; z) = -1/2 log det Cov(z | x), the marginal KL near 0."""
    lg, x = linear_gaussian(noise=(0.5, 1.0), n=2000)
    guide = posterior_guide(lg, full=True)
    s = elbo_surgery(lg.model, guide, x, num_samples=10).summary()
    _, cov = lg.posterior(x[:1])
    exact_mi = -0.5 * torch.logdet(cov.double()).item()
    mi = s["mutual_information"]
    assert abs(mi["mean"] - exact_mi) < 3 * mi["se"] + 0.02, (mi, exact_mi)
    assert mi["mean"] <= math.log(len(x))
    assert 0 <= s["marginal_kl"]["mean"] < 0.02
    # The identity: their sum is the mean KL to the prior (here in closed form).
    d = evaluate(lg.model, guide, x, num_samples=10, surgery=True)
    kl = d.kl_prior.double().mean().item()
    total = s["mutual_information"]["mean"] + s["marginal_kl"]["mean"]
    assert abs(total - kl) < 3 * mi["se"], (total, kl)
    assert "ELBO surgery: mutual information" in repr(d)
    assert d.summary()["elbo_surgery"]["log_num_data"] == pytest.approx(math.log(2000))


@pytest.mark.slow
def test_ais_of_a_pair_with_global_latents_is_the_data_sets_evidence():
    """Pyro's eight schools (no data plate: every latent is global): one chain state per data
    set; AIS matches the quadrature of log p(y_1..8) within its SE, closer than IS."""
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import Adam

    from tests.real_programs import eight_schools

    svi = SVI(eight_schools.model, eight_schools.guide, Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(3000):
        svi.step(eight_schools.DATA)
    a = annealed_evidence(eight_schools.model, eight_schools.guide, eight_schools.DATA,
                          num_chains=32, num_steps=500)
    exact = eight_schools.exact_log_evidence()
    assert a.unit == "data set" and a.log_evidence.shape == (1,)
    assert abs(a.log_evidence.item() - exact) < 3 * a.log_evidence_se.item() + 0.01
    assert a.gap.item() > 0


def test_bdmc_refuses_settings_it_cannot_run_like_annealed_evidence():
    lg, x = linear_gaussian(n=4)
    guide = posterior_guide(lg)
    for kwargs, message in (({"leapfrog_steps": 0}, "leapfrog_steps must be a positive"),
                            ({"step_size": 0.0}, "step_size must be in"),
                            ({"num_steps": 0}, "num_steps must be a positive")):
        for run in (annealed_evidence, bdmc):
            with pytest.raises(ConfigError, match=message):
                run(lg.model, guide, x, num_chains=2, **kwargs)


def test_the_report_runs_ais_on_a_run_diagnosed_on_its_training_set(tmp_path):
    """An autoguide with parameters per training point: AIS runs on the training set, from the
    guide (its density read through its auxiliary sites), and agrees with the exact log p(x)."""
    from elbogap import Report
    from elbogap.runs.run_directory import new_run, train

    run, options = new_run({"data": "synthetic", "model": "linear-gaussian", "guide": "auto-normal",
                            "batch_size": 1000, "epochs": 30, "lr": 0.05, "eval_every": 30,
                            "eval_samples": 5, "num_samples": 10, "progress": False},
                           tmp_path / "r")
    train(run, options)
    report = Report.build(run, num_samples=100, ais_steps=100, ais_chains=8, bdmc=True,
                          amortization_points=0, progress=False)
    a = report.numbers["ais"]
    assert run.split == "train" and a["start"] == "guide" and a["num_data"] == 1000
    exact = run.pair.model_object.log_evidence(run.data.train).double().mean().item()
    # The SE of the mean of 1000 per-point AIS estimates, from their own MC SE; the log of a
    # mean of weights falls short of log p(x) by about half its variance (delta method).
    se = a["log_evidence_mc_se"] / math.sqrt(a["num_data"])
    shortfall = a["log_evidence_mc_se"] ** 2 / 2
    assert -4 * se - shortfall - 1e-3 < a["log_evidence"]["mean"] - exact < 4 * se + 1e-3
    assert a["evidence_gap"]["mean"] > 0
    b = report.numbers["bdmc"]
    assert b["lower"] <= b["upper"] + 4 * b["bracket_se"]
    assert not any("AIS starts from the prior" in note.text for note in report.notes)
    assert a["convergence"]["verdict"] in ("converged", "not converged", "unsettled")


def test_a_points_chains_do_not_depend_on_the_batch_it_is_annealed_in():
    """Every draw of AIS and BDMC is keyed by (seed, point): other batch sizes, the same numbers
    (to float32 rounding: the model's products differ with the batch's shape); another seed,
    other numbers."""
    lg, x = linear_gaussian(n=7)
    guide = posterior_guide(lg, shrink=4.0)
    settings = {"num_chains": 3, "num_steps": 5, "leapfrog_steps": 2}
    whole = annealed_evidence(lg.model, guide, x, seed=3, **settings)
    for batch_size in (1, 3):
        pyro.set_rng_seed(batch_size)  # torch's own stream plays no part
        part = annealed_evidence(lg.model, guide, x, seed=3, batch_size=batch_size, **settings)
        torch.testing.assert_close(part.log_weights, whole.log_weights, rtol=1e-5, atol=1e-5)
    other = annealed_evidence(lg.model, guide, x, seed=4, **settings)
    assert not torch.allclose(other.log_weights, whole.log_weights)
    bounds = bdmc(lg.model, guide, x, seed=3, **settings)
    halves = bdmc(lg.model, guide, x, seed=3, batch_size=4, **settings)
    torch.testing.assert_close(halves.lower, bounds.lower, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(halves.upper, bounds.upper, rtol=1e-5, atol=1e-5)


def test_keyed_noise_is_standard_and_the_same_for_a_point_in_any_batch():
    from scipy import stats

    from elbogap.foundations.keyed_noise import KeyedNoise, stream_key

    key = stream_key(0, "test")
    big = KeyedNoise(key, (4, 10, 3), 1, 0, torch.device("cpu"))
    small = KeyedNoise(key, (4, 2, 3), 1, 6, torch.device("cpu"))
    assert torch.equal(big.normal(5)[:, 6:8], small.normal(5))
    many = KeyedNoise(key, (2000, 50), 0, 0, torch.device("cpu"))
    normals = torch.cat([many.normal(t).flatten() for t in range(4)]).numpy()
    uniforms = torch.cat([many.uniform(t).flatten() for t in range(4)]).numpy()
    # 400 000 draws each: a fixed key, so these p-values are fixed numbers, not flaky.
    assert stats.kstest(normals, "norm").pvalue > 0.01
    assert stats.kstest(uniforms, "uniform").pvalue > 0.01
    # Neighbouring points, and consecutive counters, are uncorrelated.
    lag = torch.corrcoef(torch.stack([many.normal(0)[:-1].flatten(), many.normal(0)[1:].flatten()]))
    step = torch.corrcoef(torch.stack([many.normal(0).flatten(), many.normal(1).flatten()]))
    assert abs(lag[0, 1]) < 4 / 316 and abs(step[0, 1]) < 4 / 316


# -- a site whose transform folds event dimensions (LKJCholesky) ----------------------------------

LKJ = dist.LKJCholesky(2, torch.tensor(2.0))


def correlation_cholesky(r: torch.Tensor) -> torch.Tensor:
    """The Cholesky factor of the 2x2 correlation matrix of correlation ``r``."""
    factor = torch.zeros(r.shape + (2, 2), dtype=r.dtype)
    factor[..., 0, 0], factor[..., 1, 0], factor[..., 1, 1] = 1, r, (1 - r**2).sqrt()
    return factor


def correlation_model(y):
    """L ~ LKJCholesky(2, 2), y_n ~ N(0, L L^T): one free correlation, whose evidence is a 1-D
    integral."""
    factor = pyro.sample("L", LKJ)
    with pyro.plate("obs", y.shape[0]):
        pyro.sample("y", dist.MultivariateNormal(torch.zeros(2), scale_tril=factor), obs=y)


def correlation_model_mm(y):
    """The same density written with torch.mm, which does not broadcast: vmapped over chains."""
    factor = pyro.sample("L", LKJ)
    with pyro.plate("obs", y.shape[0]):
        pyro.sample("y", dist.MultivariateNormal(torch.zeros(2),
                                                 covariance_matrix=torch.mm(factor, factor.t())),
                    obs=y)


def correlation_prior_guide(y):
    pyro.sample("L", LKJ)


def test_ais_anneals_an_lkj_site_whose_state_has_fewer_dimensions_than_the_site():
    """The chain's state of an LKJCholesky site is its free entries (a vector), the site a
    matrix: the momentum's kinetic energy and the chains' shapes follow the state.  AIS from the
    prior against the evidence by quadrature over the correlation; vmapped over the chains (the
    torch.mm form) it runs too."""
    pyro.set_rng_seed(0)
    y = dist.MultivariateNormal(torch.zeros(2), scale_tril=correlation_cholesky(
        torch.tensor(0.6))).sample((5,))
    r = torch.linspace(-1, 1, 200_001, dtype=torch.float64)[1:-1]
    factor = correlation_cholesky(r)
    joint = (dist.MultivariateNormal(torch.zeros(2, dtype=torch.float64), scale_tril=factor
                                     .unsqueeze(1)).log_prob(y.double()).sum(-1)
             + LKJ.log_prob(factor.float()).double())
    exact = (joint.max() + torch.trapezoid((joint - joint.max()).exp(), r).log()).item()
    ais = annealed_evidence(correlation_model, correlation_prior_guide, y, num_chains=8,
                            num_steps=100, start="prior", seed=0).summary()
    assert abs(ais["log_evidence"]["mean"] - exact) < 4 * ais["log_evidence_mc_se"]
    by_chain = annealed_evidence(correlation_model_mm, correlation_prior_guide, y,
                                 num_chains=2, num_steps=5, start="prior", seed=0).summary()
    assert math.isfinite(by_chain["log_evidence"]["mean"])


def test_bdmc_on_a_global_latent_brackets_each_simulated_data_set_with_ses_over_sets():
    """A regression written as ``pyro.condition(model, data={"y": y})``, its weight global:
    w ~ N(0, 1), y_n ~ N(w f_n, 1), so y ~ N(0, I + f f^T) exactly.  BDMC simulates y with
    the conditioning taken off (never the y it was handed), one bracket per data set; each
    bound against its set's exact evidence, with the SE the sets' spread gives."""
    f = torch.linspace(-1.0, 2.0, 12)
    y = 3.0 * f + torch.randn(12, generator=torch.Generator().manual_seed(0))

    def regression(features):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(features)):
            pyro.sample("y", dist.Normal(w * features, 1.0))

    def guide(features):
        pyro.sample("w", dist.Normal(1.0, 0.3))  # off, and too narrow

    model = pyro.condition(regression, data={"y": y})
    b = bdmc(model, guide, f, num_chains=8, num_steps=30, leapfrog_steps=5, data_sets=6,
             seed=2)
    simulated = b.observations["y"]
    assert simulated.shape == (6, 12) and not torch.equal(simulated[0], y)
    cov = torch.eye(12, dtype=torch.float64) + torch.outer(f, f).double()
    exact = dist.MultivariateNormal(torch.zeros(12, dtype=torch.float64), cov).log_prob(
        simulated.double())
    for bound, sign in ((b.upper, 1), (b.lower, -1)):
        miss = sign * (bound.double() - exact)
        assert miss.mean() >= -4 * miss.std() / math.sqrt(len(miss))
    s = b.summary()
    assert s["data_sets"] == 6 and s["num_data"] == 12 and s["check"] in ("passed",
                                                                          "inside the noise")
    assert "upper_se" not in s  # the chains' spread is no SE of a shared start


def test_a_bracket_crossed_beyond_its_noise_is_a_failed_check():
    from elbogap.diagnostics.bdmc import bracket_check
    from elbogap.presentation.table import format_bdmc

    assert bracket_check(0.1, 0.05) == "passed"
    assert bracket_check(-0.1, 0.05) == "inside the noise"
    assert bracket_check(-0.4, 0.05) == "failed"
    assert bracket_check(-0.4, None) == "unknown"
    summary = {"num_data": 20, "data_sets": 4, "num_chains": 8, "num_steps": 50, "lower": -10.0,
               "upper": -10.4, "bracket": -0.4, "bracket_se": 0.05, "check": "failed"}
    assert "4 data sets of 20 points" in format_bdmc(summary)
    assert "FAILED" in format_bdmc(summary)
