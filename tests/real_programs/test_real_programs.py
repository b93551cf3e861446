"""Pyro programs as Pyro users write them (tests/real_programs/, each mirroring one of Pyro's
examples or tutorials): evaluated, trained where it makes sense, checked against exact or
quadrature evidence wherever the model allows, or refused with a message that says why."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.optim import Adam

from elbogap import ConventionError, evaluate
from elbogap.data.dataset import Dataset
from elbogap.foundations.errors import ConfigError
from elbogap.foundations.program_data import ProgramData
from elbogap.training.fitting import FitOptions, fit
from elbogap.training.parameters import pair_parameters
from tests.real_programs import (
    baseball,
    bayesian_regression,
    cvae,
    dmm,
    eight_schools,
    ppca,
    ss_vae,
    svi_torch,
    vae,
)


def svi(model, guide, args, steps, lr=0.05):
    """``svi.step(*args)`` as Pyro's examples call it; one tensor is one argument."""
    args = args if isinstance(args, tuple) else (args,)
    opt = SVI(model, guide, Adam({"lr": lr}), Trace_ELBO())
    for _ in range(steps):
        opt.step(*args)


def set_param(name: str, value: torch.Tensor) -> None:
    """In place, so that the PyroModule holding the parameter sees it."""
    store = pyro.get_param_store()
    with torch.no_grad():
        unconstrained = pyro.param(name).unconstrained()
        unconstrained.copy_(torch.distributions.transform_to(store._constraints[name]).inv(
            value.to(unconstrained.dtype)))


def assert_within(estimate: float, exact: float, se: float, z: float = 4.0):
    assert abs(estimate - exact) <= z * se, f"{estimate} vs exact {exact} (SE {se})"


# --- refusals ---------------------------------------------------------------------------

def test_autodelta_is_refused_with_the_reason_and_the_alternatives():
    at_bats, hits = baseball.data()
    guide = AutoDelta(baseball.not_pooled)
    with pytest.raises(ConventionError, match="'phi' is a point mass.*not defined.*AutoNormal"):
        evaluate(baseball.not_pooled, guide, at_bats, hits, num_samples=10)


def test_an_auxiliary_delta_is_refused():
    at_bats, hits = baseball.data()

    def guide(at_bats, hits):
        with pyro.plate("num_players", at_bats.shape[0]):
            u = pyro.sample("u", dist.Delta(at_bats.new_zeros(at_bats.shape[0])),
                            infer={"is_auxiliary": True})
            pyro.sample("phi", dist.Beta(2 + u.exp(), 2.0))

    with pytest.raises(ConventionError, match="'u' is auxiliary.*but a Delta"):
        evaluate(baseball.not_pooled, guide, at_bats, hits, num_samples=10)


def test_the_original_eight_schools_guide_shape_is_refused():
    with pytest.raises(ConventionError, match="'eta': the guide samples shape \\(8, 1\\)"):
        evaluate(eight_schools.model, eight_schools.guide_with_original_eta_shape,
                 eight_schools.DATA, num_samples=10)


def test_the_data_plate_is_found_by_its_rows_and_a_misnamed_one_names_the_plates_found():
    at_bats, hits = baseball.data()
    guide = AutoNormal(baseball.not_pooled)
    d = evaluate(baseball.not_pooled, guide, at_bats, hits, num_samples=10)
    assert d.unit == "data point" and d.log_evidence.shape == (len(at_bats),)
    with pytest.raises(ConventionError, match="data_plate='data'.*\\['num_players'\\]"):
        evaluate(baseball.not_pooled, guide, at_bats, hits, num_samples=10, data_plate="data")


def test_observed_data_that_does_not_fit_its_distribution_is_refused():
    def model(x):
        with pyro.plate("data", 4):  # written for 4 points, handed 10
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    with pytest.raises(ConventionError, match="observed site 'x': the data there has shape "
                                              "\\(10,\\) but the model's distribution has shape"):
        evaluate(model, lambda x: None, torch.randn(10), num_samples=5)


def test_a_plate_that_subsamples_neither_x_nor_from_outside_is_refused():
    def model(x):
        with pyro.plate("data", 50, subsample_size=3) as ind:
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x[ind % len(x)])

    with pytest.raises(ConventionError, match="declares 50 points and subsamples 3, but x has 10"):
        evaluate(model, lambda x: None, torch.randn(10), num_samples=5)


def subsampling_pair(batch=10):
    """Pyro's own minibatch idiom: the plate picks B of x's rows and the pair indexes x.
    mu ~ N(0, 10^2), z_n ~ N(mu, 1), x_n ~ N(z_n, 0.5^2); q(z_n | x_n, mu) is the exact
    conditional posterior N((4 x_n + mu) / 5, 1/5), q(mu) a Gaussian."""

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(x), subsample_size=batch) as ind:
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("obs", dist.Normal(z, 0.5), obs=x[ind])

    def guide(x):
        loc = pyro.param("mu_loc", torch.tensor(0.0))
        scale = pyro.param("mu_scale", torch.tensor(1.0), constraint=dist.constraints.positive)
        mu = pyro.sample("mu", dist.Normal(loc, scale))
        with pyro.plate("data", len(x), subsample_size=batch) as ind:
            pyro.sample("z", dist.Normal((4 * x[ind] + mu) / 5, 0.2**0.5))

    return model, guide


def test_pyro_subsample_idiom_is_evaluated_over_every_point():
    x = 2.0 + 1.2 * torch.randn(33, generator=torch.Generator().manual_seed(0))
    model, guide = subsampling_pair()
    # q(mu) at the exact posterior of mu: N(sum x / (N + 1.25/100), 1.25 / (N + 0.0125)).
    n = x.shape[0]
    pyro.param("mu_loc", torch.tensor(float(x.sum()) / (n + 0.0125)))
    pyro.param("mu_scale", torch.tensor((1.25 / (n + 0.0125)) ** 0.5),
               constraint=dist.constraints.positive)
    d = evaluate(model, guide, x, num_samples=300)
    exact = float(torch.distributions.MultivariateNormal(
        torch.zeros(n, dtype=torch.float64),
        1.25 * torch.eye(n, dtype=torch.float64) + 100.0).log_prob(x.double()))
    t = d.total
    assert d.unit == "data set" and t.num_data == 33
    # The guide is the exact posterior: every weight is p(x), up to float32 rounding.
    assert abs(t.log_evidence - exact) < 2e-3 and abs(t.evidence_gap) < 2e-3


def test_pyro_subsample_idiom_trains_on_its_own_minibatches():
    x = 2.0 + 1.2 * torch.randn(40, generator=torch.Generator().manual_seed(0))
    model, guide = subsampling_pair()
    result = fit(model, guide, dataset(x), FitOptions(epochs=30, batch_size=10, lr=0.05,
                                                      eval_samples=50, progress=False))
    assert result.plan.layout.subsample == 10
    posterior_mean = float(x[:32].sum()) / (32 + 0.0125)
    assert abs(float(pyro.param("mu_loc")) - posterior_mean) < 0.3
    assert result.history[-1]["diagnostics"]["num_data"] == 32


# --- local latents, autoguides ----------------------------------------------------------

def test_baseball_not_pooled_autonormal_matches_the_exact_evidence():
    """phi ~ Uniform(0,1) under AutoNormal: a logit-normal q, KL by Monte Carlo, and
    log p(hits_i) = -log(at_bats_i + 1) exactly (the Beta-Binomial with a = b = 1)."""
    at_bats, hits = baseball.data()
    guide = AutoNormal(baseball.not_pooled)
    svi(baseball.not_pooled, guide, (at_bats, hits), 1500)
    d = evaluate(baseball.not_pooled, guide, at_bats, hits, num_samples=4000)
    assert d.unit == "data point" and d.kl_method == {"phi": "monte-carlo"}
    exact = baseball.exact_not_pooled(at_bats)
    assert_within(d.total.log_evidence, float(exact.sum()), d.total.log_evidence_se)
    assert float(d.khat.median()) < 0.7
    # The gap is KL(q || p(phi | x)) >= 0, small for a logit-normal q of a Beta posterior.
    assert 0 < d.evidence_gap.mean() < 0.1


def test_beta_guide_against_uniform_prior_in_the_particle_plate():
    """torch's KL(Beta || Uniform) indexes with a mask of the prior's batch shape: the
    particle plate must give the prior the particle dimension (Pyro's own placement)."""
    at_bats, hits = baseball.data()

    def guide(at_bats, hits):  # the exact posterior Beta(hits + 1, misses + 1)
        with pyro.plate("num_players", at_bats.shape[0]):
            pyro.sample("phi", dist.Beta(hits + 1, at_bats - hits + 1))

    d = evaluate(baseball.not_pooled, guide, at_bats, hits, num_samples=200)
    torch.testing.assert_close(d.log_evidence, baseball.exact_not_pooled(at_bats), atol=2e-4,
                               rtol=0)
    assert d.kl_method["phi"] == "analytic"
    # Constant weights up to float32 rounding: no tail to fit, k-hat -inf.
    assert (d.khat == -math.inf).all()


def test_ppca_autonormal_per_point_against_the_closed_form():
    x = ppca.data()
    guide = AutoNormal(ppca.model)
    svi(ppca.model, guide, x, 1500)
    d = evaluate(ppca.model, guide, x, num_samples=3000, batch_size=10)
    assert d.unit == "data point" and d.kl_method == {"z": "analytic"}
    exact = ppca.exact_log_evidence(x)
    z = (d.log_evidence - exact) / d.log_evidence_se
    assert z.abs().max() < 4.5 and abs(float(z.mean())) * math.sqrt(len(z)) < 4
    # An AutoNormal is fitted per point: the gap is the mean-field gap, small but positive.
    assert 0 < float(d.evidence_gap.mean()) < 0.5


def test_automultivariatenormal_at_the_exact_posterior_gives_the_exact_evidence():
    """The joint guide set to the exact posterior (block-diagonal over points): log q read off
    the auxiliary site and the Deltas' log_density must make every weight p(x)."""
    x = ppca.data(n=6)
    guide = AutoMultivariateNormal(ppca.model)
    guide(x)
    w, s2 = ppca.W.double(), ppca.SIGMA**2
    cov = torch.linalg.inv(torch.eye(ppca.K, dtype=torch.float64) + w.T @ w / s2)
    means = ((x.double() - ppca.B.double()) @ w / s2) @ cov
    chol = torch.linalg.cholesky(torch.block_diag(*[cov] * x.shape[0]))
    set_param("AutoMultivariateNormal.loc", means.reshape(-1))
    set_param("AutoMultivariateNormal.scale", chol.diagonal())
    set_param("AutoMultivariateNormal.scale_tril", chol / chol.diagonal()[:, None])
    d = evaluate(ppca.model, guide, x, num_samples=500)
    exact = float(ppca.exact_log_evidence(x).sum())
    assert d.unit == "data set" and d.elbo is None and d.kl_method == {"z": "monte-carlo"}
    assert abs(d.total.log_evidence - exact) < 1e-3 and abs(d.total.elbo - exact) < 1e-3
    assert d.total.khat == -math.inf


@pytest.mark.slow
@pytest.mark.parametrize("autoguide", [AutoMultivariateNormal, AutoDiagonalNormal,
                                       AutoLowRankMultivariateNormal])
def test_joint_autoguides_are_evaluated_over_the_data_set(autoguide):
    x = ppca.data(n=12)
    guide = autoguide(ppca.model)
    svi(ppca.model, guide, x, 2500, lr=0.03)
    d = evaluate(ppca.model, guide, x, num_samples=5000)
    assert d.unit == "data set" and d.elbo is None
    assert d.kl_method == {"z": "monte-carlo"}
    exact = float(ppca.exact_log_evidence(x).sum())
    t = d.total
    assert t.elbo < exact + 4 * t.elbo_se
    # Within its SE where k-hat says the estimate converges; a lower bound otherwise.
    if t.khat < 0.5:
        assert_within(t.log_evidence, exact, t.log_evidence_se)
    else:
        assert t.log_evidence < exact + 4 * t.log_evidence_se
    if t.khat > 0.7:
        assert "NOT reliable" in d.summary()["khat"]["verdict"]


# --- global latents --------------------------------------------------------------------

def conjugate_regression(n=25, d=3, noise=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = f @ torch.randn(d, generator=g, dtype=torch.float64) + noise * torch.randn(
        n, generator=g, dtype=torch.float64)
    precision = torch.eye(d, dtype=torch.float64) + f.T @ f / noise**2
    cov = torch.linalg.inv(precision)
    mean = cov @ f.T @ y / noise**2
    log_evidence = torch.distributions.MultivariateNormal(
        torch.zeros(n, dtype=torch.float64),
        noise**2 * torch.eye(n, dtype=torch.float64) + f @ f.T).log_prob(y)
    return torch.cat([f, y[:, None]], 1).float(), mean, cov, float(log_evidence), noise


@pytest.mark.slow
def test_conjugate_regression_global_latents_against_closed_forms():
    """w ~ N(0, I), y_n ~ N(f_n . w, s^2): exact log p(y_1..N) and posterior.  A mean-field
    Gaussian guide's gap is KL(q(w) || p(w | y)), in closed form."""
    data, mean, cov, log_evidence, noise = conjugate_regression()
    d_w = mean.shape[0]

    def model(x):
        w = pyro.sample("w", dist.Normal(x.new_zeros(d_w), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal((x[:, :-1] * w.unsqueeze(-2)).sum(-1), noise), obs=x[:, -1])

    q_loc, q_scale = mean.float() + 0.05, (0.9 * cov.diagonal().sqrt()).float()

    def guide(x):
        pyro.sample("w", dist.Normal(q_loc, q_scale).to_event(1))

    d = evaluate(model, guide, data, num_samples=8000, batch_size=10)
    t = d.total
    q = torch.distributions.Normal(q_loc.double(), q_scale.double())
    post = torch.distributions.MultivariateNormal(mean, cov)
    kl = float(torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(q.loc, torch.diag(q.scale**2)), post))
    assert d.unit == "data set" and t.num_data == 25 and t.khat < 0.7
    assert_within(t.log_evidence, log_evidence, t.log_evidence_se)
    assert_within(t.evidence_gap, kl, t.evidence_gap_se)
    assert_within(t.elbo, log_evidence - kl, t.elbo_se)
    summary = d.summary()
    assert summary["unit"] == "data set" and "elbo" not in summary
    assert summary["total"]["log_evidence"] == pytest.approx(t.log_evidence)


def test_beta_bernoulli_constrained_global_latent():
    """theta ~ Beta(2, 3), x_n ~ Bernoulli(theta): log p(x) = log B(2 + k, 3 + n - k) - log B(2, 3),
    and a Beta guide's gap is KL(q || Beta(2 + k, 3 + n - k))."""
    x = (torch.rand(30, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    k, n = float(x.sum()), x.shape[0]

    def model(x):
        theta = pyro.sample("theta", dist.Beta(2.0, 3.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Bernoulli(theta), obs=x)

    def log_beta(a, b):
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    exact = log_beta(2 + k, 3 + n - k) - log_beta(2, 3)
    q = dist.Beta(2 + k + 3.0, 3 + n - k)

    def guide(x):
        pyro.sample("theta", q)

    d = evaluate(model, guide, x, num_samples=20000, batch_size=7)
    t = d.total
    kl = float(torch.distributions.kl_divergence(q, dist.Beta(2 + k, 3 + n - k)))
    assert d.kl_method == {"theta": "analytic"}
    assert_within(t.log_evidence, exact, t.log_evidence_se)
    assert_within(t.evidence_gap, kl, t.evidence_gap_se)


def test_baseball_partially_pooled_autonormal_trains_and_is_evaluated_jointly():
    at_bats, hits = baseball.data()
    guide = AutoNormal(baseball.partially_pooled)
    svi(baseball.partially_pooled, guide, (at_bats, hits), 800)
    d = evaluate(baseball.partially_pooled, guide, at_bats, hits, num_samples=2000, batch_size=6)
    t = d.total
    assert d.unit == "data set" and set(d.kl_method) == {"m", "kappa", "phi"}
    assert math.isfinite(t.log_evidence) and t.evidence_gap > -4 * t.evidence_gap_se
    # Not-pooled evidence is a different model's; the pooled one must be finite and the note
    # must name the global sites.
    assert any("['m', 'kappa']" in note for note in d.notes)


@pytest.mark.slow
def test_eight_schools_against_quadrature():
    pyro.set_rng_seed(1)
    svi(eight_schools.model, eight_schools.guide, eight_schools.DATA, 3000, lr=0.02)
    d = evaluate(eight_schools.model, eight_schools.guide, eight_schools.DATA, num_samples=50000)
    t = d.total
    exact = eight_schools.exact_log_evidence()
    assert d.unit == "data set" and any("no data plate" in n or "global" in n for n in d.notes)
    assert t.elbo < exact
    if t.khat < 0.5:
        assert_within(t.log_evidence, exact, t.log_evidence_se)
    else:
        assert t.log_evidence < exact + 4 * t.log_evidence_se


@pytest.mark.slow
def test_bayesian_regression_tutorial_does_not_broadcast_and_is_vmapped():
    features, y = bayesian_regression.data()
    model = bayesian_regression.BayesianRegression()
    guide = AutoDiagonalNormal(model)
    svi(model, guide, (features, y), 2500, lr=0.03)
    d = evaluate(model, guide, features, y, num_samples=1500)
    t = d.total
    exact = bayesian_regression.exact_log_evidence(features, y)
    assert any("vectorized with torch.func.vmap" in n for n in d.notes)
    assert d.unit == "data set" and t.elbo < exact
    if t.khat < 0.5:
        assert_within(t.log_evidence, exact, t.log_evidence_se)
    else:
        assert t.log_evidence < exact + 4 * t.log_evidence_se


# --- sequences of different lengths ----------------------------------------------------

def test_dmm_batches_with_different_sites_are_merged():
    """Shortest sequences first, then longest first: no KeyError, and every point's ELBO stays
    below its exact log p(x) (dropping a later batch's sites made it too high)."""
    sequences = dmm.data()
    net = dmm.DMM()
    for order in (sequences, dmm.flipped(sequences)):
        d = evaluate(net.model, net.guide, *order, num_samples=2000, batch_size=10)
        lengths = order[3]
        truth = dmm.exact_log_evidence(order[0], lengths)
        assert (d.elbo - truth < 4 * d.elbo_se).all()
        z = (d.log_evidence - truth) / d.log_evidence_se
        assert abs(float(z.mean())) * math.sqrt(len(z)) < 4.5
        # A 3-step sequence has no z_12: KL 0 there.
        assert (d.kl_sites["z_12"][lengths < 12] == 0).all()
        assert (d.kl_sites["z_12"][lengths == 12] > 0).all()


# --- training through fit --------------------------------------------------------------

def dataset(*arguments):
    """The program's arguments, 80% to train on and 20% held out."""
    data = ProgramData.of(*arguments)
    cut = int(0.8 * data.shape[0])
    return Dataset("corpus", data[:cut], data[cut:], None, "the model's")


def test_cvae_masks_and_size_less_plate_train_and_evaluate():
    net = cvae.CVAE()
    data = dataset(*cvae.data(40))
    result = fit(net.model, net.guide, data, FitOptions(epochs=2, batch_size=8, eval_samples=30,
                                                        progress=False))
    record = result.history[-1]
    assert math.isfinite(record["train_elbo"]) and record["test_elbo"] is not None
    assert any("vectorized with torch.func.vmap" in n for n in record["diagnostics"]["notes"])


def test_ss_vae_enumerated_guide_trains_with_trace_enum():
    net = ss_vae.SSVAE()
    data = dataset(ss_vae.data(60))
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    result = fit(net.model, net.guide, data, FitOptions(epochs=3, batch_size=12, elbo="enum",
                                                        eval_samples=30, progress=False, lr=0.01))
    after = net.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    summary = result.history[-1]["diagnostics"]
    # q(y | x) is summed over its values, as the reconstruction is: its KL exact, not sampled.
    assert summary["kl_sites"]["y"]["method"] == "enumerated"
    assert result.history[-1]["train_elbo"] > result.history[0]["train_elbo"] - 5


def test_svi_torch_module_local_params_and_minibatch_plate_train():
    pyro.settings.set(module_local_params=True)
    try:
        data = dataset(*svi_torch.data(200))
        model = svi_torch.Model(data.train.shape[0])
        guide = AutoNormal(model)
        result = fit(model, guide, data, FitOptions(epochs=15, batch_size=20, lr=0.05,
                                                    eval_samples=200, progress=False))
        assert len(pyro.get_param_store()) == 0  # the parameters live in the modules
        assert "guide.locs.coeff_unconstrained" in pair_parameters(model, guide)
        loc = dict(guide.named_parameters())["locs.coeff_unconstrained"]
        assert abs(float(loc) - 1.5) < 0.2
        summary = result.history[-1]["diagnostics"]
        assert summary["unit"] == "data set" and summary["num_data"] == data.train.shape[0]
        assert result.history[-1]["test_elbo"] is None
    finally:
        pyro.settings.set(module_local_params=False)


def test_autonormal_on_local_latents_trains_on_the_whole_set_and_is_evaluated_there():
    x = ppca.data(40)
    data = dataset(x)
    guide = AutoNormal(ppca.model)
    with pytest.raises(ConfigError, match="parameters per data point.*batch_size 32"):
        fit(ppca.model, guide, data, FitOptions(epochs=1, batch_size=8, progress=False))
    pyro.clear_param_store()
    guide = AutoNormal(ppca.model)
    result = fit(ppca.model, guide, data, FitOptions(epochs=30, batch_size=32, lr=0.05,
                                                     eval_samples=100, progress=False))
    assert result.plan.split == "train"
    assert result.history[-1]["diagnostics"]["num_data"] == 32


def test_pyro_vae_example_trains_and_evaluates():
    net = vae.VAE()
    x = (ss_vae.data(80, pixels=64) > 0.5).float()
    result = fit(net.model, net.guide, dataset(x), FitOptions(epochs=2, batch_size=16,
                                                              eval_samples=30, progress=False))
    assert result.plan.held_out and result.history[-1]["diagnostics"]["unit"] == "data point"


def test_khat_needs_a_tail_of_five_weights():
    x = ppca.data(6)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(ppca.K), 1.0).to_event(1))

    assert "khat" not in evaluate(ppca.model, guide, x, num_samples=24).summary()
    d = evaluate(ppca.model, guide, x, num_samples=25)
    assert torch.isfinite(d.khat).all()


@pytest.mark.slow
def test_cli_autoguide_around_a_model_alone_with_a_named_plate(tmp_path):
    """scripts/fit.py --model file.py:factory (returning a model alone) --guide auto-normal
    --data-plate rows, then scripts/evaluate.py on the run: the autoguide has parameters per
    training point, so both diagnose the training split."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    pair = tmp_path / "pair.py"
    pair.write_text(
        "import pyro, pyro.distributions as dist, torch\n"
        "def make(data_dim):\n"
        "    def model(x):\n"
        "        w = pyro.param('W', lambda: 0.1 * torch.randn(data_dim, 3))\n"
        "        with pyro.plate('rows', x.shape[0]):\n"
        "            z = pyro.sample('z', dist.Normal(x.new_zeros(3), 1.0).to_event(1))\n"
        "            pyro.sample('x', dist.Normal(z @ w.T, 0.5).to_event(1), obs=x)\n"
        "    return model\n")
    run = tmp_path / "run"
    common = [sys.executable]
    out = subprocess.run(common + [str(root / "scripts/fit.py"), "--model", f"{pair}:make",
                                   "--guide", "auto-normal", "--data", "synthetic",
                                   "--data-plate", "rows", "--batch-size", "1000", "--epochs", "2",
                                   "-K", "30", "--eval-samples", "30", "--out", str(run),
                                   "--no-progress"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "site 'z' (analytic)" in out.stdout and "N=1000" in out.stdout
    out = subprocess.run(common + [str(root / "scripts/evaluate.py"), str(run), "-K", "30",
                                   "--trust-code", "--no-progress"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (run / "evaluation-train-K30.json").is_file()


@pytest.mark.slow
def test_held_out_points_get_the_posterior_predictive_density():
    """With q(w) = N(m, diag s^2) the predictive density of a new point is Gaussian:
    p_q(y | f) = N(y; f . m, sigma^2 + sum_i f_i^2 s_i^2)."""
    from elbogap.diagnostics.predictive import posterior_predictive

    data, mean, cov, _, noise = conjugate_regression()
    d_w = mean.shape[0]
    held_out = conjugate_regression(n=15, seed=5)[0]

    def model(x):
        w = pyro.sample("w", dist.Normal(x.new_zeros(d_w), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal((x[:, :-1] * w.unsqueeze(-2)).sum(-1), noise), obs=x[:, -1])

    m, s = mean.float(), cov.diagonal().sqrt().float()

    def guide(x):
        pyro.sample("w", dist.Normal(m, s).to_event(1))

    p = posterior_predictive(model, guide, held_out, num_samples=4000, batch_size=5)
    f, y = held_out[:, :-1].double(), held_out[:, -1].double()
    exact = torch.distributions.Normal(f @ m.double(), (noise**2 + (f**2) @ s.double()**2).sqrt()
                                       ).log_prob(y)
    z = (p.log_density - exact) / p.log_density_se
    assert z.abs().max() < 4.5 and abs(float(z.mean())) * math.sqrt(len(z)) < 4
    summary = p.summary()
    assert summary["name"].startswith("log posterior predictive")
    assert summary["num_data"] == 15 and (p.khat < 0.5).all()


def test_training_scales_local_sites_only():
    from pyro import poutine

    from elbogap.training.minibatch import ScaleDataPlate

    def model(x):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(w, 1.0))
            pyro.sample("x", dist.Normal(w, 1.0), obs=x)

    trace = poutine.trace(ScaleDataPlate("data", 100)(model)).get_trace(torch.randn(8))
    assert trace.nodes["w"]["scale"] == 1.0
    assert trace.nodes["z"]["scale"] == trace.nodes["x"]["scale"] == 100 / 8

    # Pyro's idioms: the plate declares N and scales by N / B itself.
    def declared(size):
        def model(x):
            with pyro.plate("data", size, len(x)):
                pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)
        return model

    for size in (100, 50):  # the data set's size; another (then corrected to 100)
        trace = poutine.trace(ScaleDataPlate("data", 100)(declared(size))).get_trace(
            torch.randn(8))
        assert trace.nodes["x"]["scale"] == pytest.approx(100 / 8)

    def sizeless(x):
        with pyro.plate("data"):
            pyro.sample("x", dist.Normal(torch.zeros(x.shape[0]), 1.0), obs=x)

    scaled = ScaleDataPlate("data", 100)
    scaled.rows = 8
    assert poutine.trace(scaled(sizeless)).get_trace(torch.randn(8)).nodes["x"]["scale"] == 12.5


def test_dmm_trains_with_sequences_of_different_lengths():
    """The sequences' maximum length steers Python (int(lengths.max())): no recording can be
    trusted, so training runs eagerly and says so once; every epoch's diagnostics merge the
    batches' different sites."""
    net = dmm.DMM()
    sequences = ProgramData.of(*dmm.data(60))
    data = Dataset("dmm", sequences[::2], sequences[1::2], None, "the model's")
    result = fit(net.model, net.guide, data, FitOptions(epochs=3, batch_size=10, lr=0.01,
                                                        eval_samples=30, progress=False))
    assert not result.step.compiled.enabled and "dmm.py" in result.step.compiled.reason
    assert result.history[-1]["train_elbo"] > result.history[0]["train_elbo"] - 1
    assert "z_12" in result.history[-1]["diagnostics"]["kl_sites"]
