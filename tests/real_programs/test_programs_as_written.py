"""Pyro programs called the way Pyro calls them: any signature, the data plate found by its rows,
discrete latents summed out exactly, modules that hold their own data.  Each program mirrors a
public Pyro example or tutorial (named in its test), checked against exact answers."""

import itertools
import math
import types

import numpy as np
import pyro
import pyro.contrib.gp as gp
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal, AutoNormal
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from elbogap import (
    ConventionError,
    DataError,
    FitOptions,
    annealed_evidence,
    bdmc,
    evaluate,
    fit,
)
from elbogap.foundations.errors import ConfigError
from tests.real_programs import baseball, bayesian_regression

SIGMA = 0.8  # the regression's noise, known here, as bayesian_regression.data draws it


def within(estimate: float, exact: float, se: float, sds: float = 4.0) -> bool:
    return abs(estimate - exact) <= sds * se


def test_a_regression_written_model_features_y_is_evaluated_and_fitted_without_a_wrapper():
    pyro.set_rng_seed(0)
    features, y = bayesian_regression.data()
    model = bayesian_regression.BayesianRegression(sigma=SIGMA)
    guide = AutoMultivariateNormal(model)
    result = fit(model, guide, (features, y), FitOptions(epochs=500, batch_size=40, lr=0.05,
                                                         eval_every=500, eval_samples=50,
                                                         progress=False))
    assert result.plan.split == "train"
    d = evaluate(model, guide, features, y, num_samples=4000)
    exact = bayesian_regression.exact_log_evidence_given_sigma(features, y, SIGMA)
    assert d.unit == "data set" and d.total.num_data == 40
    assert d.observed == ("obs",) and d.conditional  # log p(y | features)
    assert within(d.total.log_evidence, exact, d.total.log_evidence_se)
    # Fitted: the ELBO is within a nat of the evidence (the guide as initialized is tens away).
    assert d.total.evidence_gap < 1.0
    # The same numbers with y passed by keyword, as Pyro's SVI.step(x, y=y) would.
    pyro.set_rng_seed(1)
    by_keyword = evaluate(model, guide, features, y=y, num_samples=1000)
    assert within(by_keyword.total.log_evidence, exact, by_keyword.total.log_evidence_se)


def test_an_option_that_is_also_an_argument_of_the_model_is_refused_as_ambiguous():
    def model(x, num_samples=None):
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    with pytest.raises(ConfigError, match="num_samples.*both options of evaluate"):
        evaluate(model, lambda x, num_samples=None: None, torch.zeros(3), num_samples=3)


def test_a_plate_named_num_players_is_found_without_data_plate():
    """Pyro's examples/baseball.py ``fully_pooled(at_bats, hits)``, plate "num_players"."""
    at_bats, hits = baseball.data()
    pyro.set_rng_seed(0)
    guide = AutoNormal(baseball.fully_pooled)
    svi = SVI(baseball.fully_pooled, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(600):
        svi.step(at_bats, hits)
    d = evaluate(baseball.fully_pooled, guide, at_bats, hits, num_samples=4000)
    exact = baseball.exact_fully_pooled(at_bats, hits)
    assert d.unit == "data set" and d.total.num_data == 18
    assert within(d.total.log_evidence, exact, d.total.log_evidence_se)


def test_two_plates_that_could_index_the_data_are_refused_with_both_named():
    # Two groups of observations with plates of their own, as in a ratings model of users and
    # items (Pyro's examples/sparse_gamma_def.py has plates "data" and "words" of this kind).
    def model(user_scores, item_scores):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("users", len(user_scores)):
            pyro.sample("user_obs", dist.Normal(mu, 1.0), obs=user_scores)
        with pyro.plate("items", len(item_scores)):
            pyro.sample("item_obs", dist.Normal(mu, 1.0), obs=item_scores)

    guide = AutoNormal(model)
    users, items = torch.randn(5), torch.randn(7)
    with pytest.raises(ConventionError, match="'users' \\(size 5.*'items' \\(size 7"):
        evaluate(model, guide, users, items, num_samples=10)
    # Naming one does not make the other group's observations data points of it.
    with pytest.raises(ConventionError, match="'item_obs' is not inside pyro.plate\\('users'"):
        evaluate(model, guide, users, items, num_samples=10, data_plate="users")


def test_a_dataloader_is_fed_to_fit():
    pyro.set_rng_seed(0)
    features, y = bayesian_regression.data(64)
    model = bayesian_regression.BayesianRegression(sigma=SIGMA)
    guide = AutoNormal(model)
    loader = DataLoader(TensorDataset(features, y), batch_size=16, shuffle=True)
    result = fit(model, guide, loader, FitOptions(epochs=40, lr=0.05, eval_samples=50,
                                                  eval_every=40, progress=False))
    history = result.history
    assert history[-1]["train_objective"] > history[0]["train_objective"] + 1
    # A minibatch is the loader's 16 points; the diagnostics cover all 64.
    assert result.step.scale.rows == 16
    assert history[-1]["diagnostics"]["num_data"] == 64

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(features, y, strict=True))

    with pytest.raises(DataError, match="IterableDataset has no length"):
        fit(model, guide, DataLoader(Stream(), batch_size=16), FitOptions(progress=False))


def test_a_gp_module_is_evaluated_with_no_arguments_and_its_elbo_is_the_closed_form():
    """pyro.contrib.gp's VariationalGP, as in Pyro's GP tutorial: the module holds X and y and
    its model and guide take no argument."""
    pyro.set_rng_seed(0)
    # Well-spaced inputs keep the float32 Cholesky of the kernel matrix accurate.
    x = torch.linspace(0.0, 6.0, 10)
    y = torch.sin(x) + 0.2 * torch.randn(10)
    vgp = gp.models.VariationalGP(x, y, gp.kernels.RBF(input_dim=1), gp.likelihoods.Gaussian(),
                                  whiten=True, jitter=1e-3)
    svi = SVI(vgp.model, vgp.guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    for _ in range(300):
        svi.step()
    d = evaluate(vgp.model, vgp.guide, num_samples=2000)
    with torch.no_grad():
        # The program's ELBO in closed form: q = N(m, S) against p = N(0, I) (whitened), and a
        # likelihood that reads q's moments, not the draw of f.
        m, tril = vgp.f_loc.double(), vgp.f_scale_tril.double()
        q = torch.distributions.MultivariateNormal(m, scale_tril=tril)
        p = torch.distributions.MultivariateNormal(torch.zeros_like(m),
                                                   scale_tril=torch.eye(len(m), dtype=m.dtype))
        kl = float(torch.distributions.kl_divergence(q, p))
        kff = vgp.kernel(x).double() + 1e-3 * torch.eye(10, dtype=torch.float64)
        lff = torch.linalg.cholesky(kff)
        f_loc, f_var = lff @ m, (lff @ tril).pow(2).sum(-1)
        variance = vgp.likelihood.variance.double()
        log_lik = float(torch.distributions.Normal(f_loc, (f_var + variance).sqrt())
                        .log_prob(y.double()).sum())
    assert d.unit == "data set" and d.total.num_data == 1
    assert d.total.elbo == pytest.approx(log_lik - kl, abs=2e-3)
    assert d.total.kl_prior == pytest.approx(kl, abs=2e-3)
    # The likelihood does not read f: the program's evidence is the likelihood itself.
    assert within(d.total.log_evidence, log_lik, max(d.total.log_evidence_se, 1e-3))
    assert any("depend on none of them" in note for note in d.notes)


# -- discrete latents summed out ---------------------------------------------------------------

K, SCALE, CONCENTRATION = 2, 1.0, 0.5
PRIOR_MEANS = torch.tensor([0.0, 10.0])  # distinct, so that the labels cannot switch


@config_enumerate
def mixture(data):
    """Pyro's Gaussian mixture tutorial (gmm.ipynb), with distinct prior means for the
    components and a known scale so that the evidence is a finite sum of Gaussians."""
    weights = pyro.sample("weights", dist.Dirichlet(CONCENTRATION * torch.ones(K)))
    with pyro.plate("components", K):
        locs = pyro.sample("locs", dist.Normal(PRIOR_MEANS, 3.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], SCALE), obs=data)


def mixture_evidence(data) -> float:
    """Every assignment of the points: a Dirichlet-multinomial for the weights times, per
    component, y ~ N(mean 1, SCALE^2 I + 9 11^T) for the points it holds."""
    n, alpha = len(data), torch.tensor(CONCENTRATION, dtype=torch.float64)
    terms = []
    for labels in itertools.product(range(K), repeat=n):
        labels = torch.tensor(labels)
        counts = torch.bincount(labels, minlength=K).double()
        term = (torch.lgamma(K * alpha) - torch.lgamma(n + K * alpha)
                + (torch.lgamma(counts + alpha) - torch.lgamma(alpha)).sum())
        for k in range(K):
            points = data[labels == k].double()
            if len(points):
                cov = SCALE**2 * torch.eye(len(points), dtype=torch.float64) + 9.0
                term = term + torch.distributions.MultivariateNormal(
                    PRIOR_MEANS[k].double().expand(len(points)), cov).log_prob(points)
        terms.append(term)
    return float(torch.logsumexp(torch.stack(terms), 0))


def enumerated_elbo(model, guide, *args, repeats=10, particles=100, max_plate_nesting=1,
                    vectorize=False):
    """TraceEnum_ELBO's ELBO and its standard error, from repeated estimates."""
    elbo = TraceEnum_ELBO(max_plate_nesting=max_plate_nesting, num_particles=particles,
                          vectorize_particles=vectorize)
    values = torch.tensor([-elbo.loss(model, guide, *args) for _ in range(repeats)],
                          dtype=torch.float64)
    return float(values.mean()), float(values.std() / math.sqrt(repeats))


def test_a_mixture_with_enumerated_assignments_matches_its_exact_evidence_and_trace_enum():
    pyro.set_rng_seed(0)
    data = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0])
    guide = AutoNormal(poutine.block(mixture, hide=["assignment"]))
    svi = SVI(mixture, guide, pyro.optim.Adam({"lr": 0.05}), TraceEnum_ELBO(max_plate_nesting=1))
    for _ in range(400):
        svi.step(data)
    # locs[assignment] does not broadcast over particles, and Pyro's enumeration reads
    # value.data, which vmap forbids: one particle at a time, so K is modest.
    d = evaluate(mixture, guide, data, num_samples=1000)
    assert d.unit == "data set" and d.observed == ("obs",)
    assert any("['assignment']" in note and "summed out exactly" in note for note in d.notes)
    assert within(d.total.log_evidence, mixture_evidence(data), d.total.log_evidence_se)
    pyro_elbo, pyro_se = enumerated_elbo(mixture, guide, data, particles=50)
    assert within(d.total.elbo, pyro_elbo, math.hypot(d.total.elbo_se, pyro_se))


def hmm(sequences, lengths, args, batch_size=None, include_prior=True):
    """Pyro's examples/hmm.py ``model_1`` (sequences of different lengths masked, states
    enumerated under pyro.markov, plate "sequences" at dim -2 and "tones" at -1), with two
    states, one tone and two scalar globals in place of the probs_x / probs_y tables, so that
    quadrature over them gives the exact evidence:

        stay ~ Beta(2, 2),  flip ~ Beta(1, 4),  P(x_t = x_{t-1}) = stay,
        P(y_t = 1 | x_t = 1) = 1 - flip,  P(y_t = 1 | x_t = 0) = flip
    """
    num_sequences, max_length, data_dim = map(int, sequences.shape)
    with poutine.mask(mask=include_prior):
        stay = pyro.sample("stay", dist.Beta(2.0, 2.0))
        flip = pyro.sample("flip", dist.Beta(1.0, 4.0))
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, batch_size, dim=-2) as batch:
        lengths = lengths[batch]
        x = torch.tensor(0.0)
        for t in pyro.markov(range(max_length if args.jit else int(lengths.max()))):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                x = pyro.sample(f"x_{t}", dist.Bernoulli(torch.where(x == 1, stay, 1 - stay)),
                                infer={"enumerate": "parallel"})
                with tones_plate:
                    pyro.sample(f"y_{t}", dist.Bernoulli(torch.where(x == 1, 1 - flip, flip)),
                                obs=sequences[batch, t])


def hmm_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([10, 6, 9, 8, 10, 7, 5, 10, 9, 8, 6, 10])
    sequences = torch.zeros(len(lengths), 10, 1)
    for i, length in enumerate(lengths):
        state = 0
        for t in range(int(length)):
            state = state if torch.rand(1, generator=g) < 0.8 else 1 - state
            sequences[i, t, 0] = float(torch.rand(1, generator=g) < (0.85 if state else 0.15))
    return sequences, lengths


def hmm_evidence(sequences, lengths, nodes=200) -> float:
    """The forward algorithm gives log p(y | stay, flip); Gauss-Legendre quadrature over both."""
    u, w = (torch.tensor(a, dtype=torch.float64) for a in np.polynomial.legendre.leggauss(nodes))
    u, w = (u + 1) / 2, w / 2
    stay, flip = u[:, None], u[None, :]
    log_lik = torch.zeros(nodes, nodes, dtype=torch.float64)
    for sequence, length in zip(sequences.double(), lengths, strict=True):
        belief = (torch.ones(nodes, nodes, dtype=torch.float64), torch.zeros(nodes, nodes,
                                                                            dtype=torch.float64))
        for t in range(int(length)):
            one = belief[0] * (1 - stay) + belief[1] * stay
            emits = (flip, 1 - flip) if sequence[t, 0] == 1 else (1 - flip, flip)
            joint = ((1 - one) * emits[0], one * emits[1])
            evidence = joint[0] + joint[1]
            log_lik = log_lik + evidence.log()
            belief = (joint[0] / evidence, joint[1] / evidence)
    log_prior = (torch.distributions.Beta(2.0, 2.0).log_prob(stay)
                 + torch.distributions.Beta(1.0, 4.0).log_prob(flip))
    return float(torch.logsumexp((log_prior + log_lik + torch.log(w[:, None] * w[None, :]))
                                 .flatten(), 0))


def test_an_hmm_with_enumerated_states_matches_the_forward_algorithm_and_trace_enum():
    pyro.set_rng_seed(0)
    sequences, lengths = hmm_data()
    args = types.SimpleNamespace(jit=False)
    guide = AutoMultivariateNormal(poutine.block(hmm, expose=["stay", "flip"]))
    svi = SVI(hmm, guide, pyro.optim.Adam({"lr": 0.05}), TraceEnum_ELBO(max_plate_nesting=2))
    for _ in range(600):
        svi.step(sequences, lengths, args)
    # The program's own arguments: two tensors of one row per sequence, and args passed whole.
    d = evaluate(hmm, guide, sequences, lengths, args, num_samples=8000)
    assert d.unit == "data set" and d.total.num_data == 12
    assert d.total.khat < 0.7
    assert within(d.total.log_evidence, hmm_evidence(sequences, lengths),
                  d.total.log_evidence_se)
    pyro_elbo, pyro_se = enumerated_elbo(hmm, guide, sequences, lengths, args,
                                         repeats=20, particles=1000, max_plate_nesting=2,
                                         vectorize=True)
    assert within(d.total.elbo, pyro_elbo, math.hypot(d.total.elbo_se, pyro_se))


def test_ais_and_bdmc_anneal_the_hmms_continuous_latents_with_its_states_summed_out():
    """AIS from the prior over (stay, flip), the states summed out at every step: within its SE
    of the forward algorithm's evidence.  BDMC simulates sequences from the whole program (the
    states drawn, not enumerated) and anneals both ways with them summed out."""
    sequences, lengths = hmm_data()
    sequences, lengths = sequences[:4, :5], lengths[:4].clamp(max=5)
    args = types.SimpleNamespace(jit=False)
    guide = AutoNormal(poutine.block(hmm, expose=["stay", "flip"]))
    a = annealed_evidence(hmm, guide, sequences, lengths, args, num_chains=16, num_steps=50,
                          leapfrog_steps=5, start="prior")
    assert a.unit == "data set"
    assert within(a.log_evidence[0].item(), hmm_evidence(sequences, lengths),
                  a.log_evidence_se[0].item())
    # One bracket per simulated data set (all reverse chains of a set start at its one
    # simulating draw, so their spread says nothing of the upper bound's error): each set's
    # bounds against its own exact evidence, with SEs over the independent sets.
    b = bdmc(hmm, guide, sequences, lengths, args, num_chains=16, num_steps=50,
             leapfrog_steps=5, start="prior", seed=1)
    simulated = torch.stack([b.observations[f"y_{t}"] for t in range(5)], 2)
    assert simulated.shape == (4, *sequences.shape)
    assert set(simulated.unique().tolist()) <= {0.0, 1.0}
    exact = torch.tensor([hmm_evidence(s, lengths) for s in simulated], dtype=torch.float64)
    for bound, sign in ((b.upper, 1), (b.lower, -1)):
        miss = sign * (bound.double() - exact)  # >= 0 in expectation
        assert miss.mean() >= -4 * miss.std() / math.sqrt(len(miss)), (bound, exact)
    assert b.summary()["check"] != "failed"


def test_a_continuous_latent_whose_prior_depends_on_an_enumerated_site_is_refused():
    @config_enumerate
    def model(x):
        with pyro.plate("data", len(x)):
            d = pyro.sample("d", dist.Bernoulli(0.5))
            z = pyro.sample("z", dist.Normal(3.0 * d, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x, 1.0))

    with pytest.raises(ConventionError, match="'z'.*depends on enumerated site"):
        evaluate(model, guide, torch.randn(4), num_samples=10)


def cjs_model_1(capture_history, sex):
    """Pyro's examples/capture_recapture/cjs.py ``model_1``, as written there: survival phi and
    recapture rho, each animal's alive/dead states z_t enumerated under pyro.markov and masked
    before its first capture (as its comments intend: see ``cjs_evidence`` for what runs)."""
    N, T = capture_history.shape
    phi = pyro.sample("phi", dist.Uniform(0.0, 1.0))  # survival probability
    rho = pyro.sample("rho", dist.Uniform(0.0, 1.0))  # recapture probability

    with pyro.plate("animals", N, dim=-1):
        z = torch.ones(N)
        # we use this mask to eliminate extraneous log probabilities
        # that arise for a given individual before its first capture.
        first_capture_mask = torch.zeros(N).bool()
        for t in pyro.markov(range(T)):
            with poutine.mask(mask=first_capture_mask):
                mu_z_t = first_capture_mask.float() * phi * z + (1 - first_capture_mask.float())
                # we use parallel enumeration to exactly sum out
                # the discrete states z_t.
                z = pyro.sample(f"z_{t}", dist.Bernoulli(mu_z_t),
                                infer={"enumerate": "parallel"})
                mu_y_t = rho * z
                pyro.sample(f"y_{t}", dist.Bernoulli(mu_y_t),
                            obs=capture_history[:, t])
            first_capture_mask |= capture_history[:, t].bool()


def capture_histories(n=30, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    history = torch.zeros(n, t)
    for i in range(n):
        first, alive = int(torch.randint(0, 3, (1,), generator=g)), True
        history[i, first] = 1.0
        for s in range(first + 1, t):
            alive = alive and bool(torch.rand(1, generator=g) < 0.8)
            history[i, s] = float(alive and bool(torch.rand(1, generator=g) < 0.6))
    return history


def cjs_evidence(history, nodes=120) -> float:
    """The program's sum over states by the forward algorithm, for each (phi, rho) of a
    Gauss-Legendre grid on the unit square (Uniform priors).

    As the program runs, not as its comment intends: ``first_capture_mask |= ...`` updates in
    place the tensor that ``poutine.mask`` holds, so when log-densities are read (after the run,
    by TraceEnum_ELBO and elbogap alike) every site's mask is the final one, True for every
    animal once captured.  Every site counts: before its first capture an animal's state is 1
    (mu = 1) and each y_t = 0 there scores 1 - rho."""
    u, w = (torch.tensor(a, dtype=torch.float64) for a in np.polynomial.legendre.leggauss(nodes))
    u, w = (u + 1) / 2, w / 2
    phi, rho = u[:, None], u[None, :]
    log_lik = torch.zeros(nodes, nodes, dtype=torch.float64)
    for row in history.double():
        alpha = (torch.zeros(nodes, nodes, dtype=torch.float64),  # weight of z = 0, of z = 1
                 torch.ones(nodes, nodes, dtype=torch.float64))
        seen = False
        for y in row.tolist():
            recaptured = rho if y else 1 - rho
            if seen:
                dead = alpha[0] + alpha[1] * (1 - phi)
                alpha = (dead * (1.0 - y), alpha[1] * phi * recaptured)
            else:  # mu = 1: alive, whatever came before
                alpha = (torch.zeros_like(alpha[0]), (alpha[0] + alpha[1]) * recaptured)
            seen = seen or y == 1.0
        log_lik = log_lik + (alpha[0] + alpha[1]).log()
    return float(torch.logsumexp((log_lik + torch.log(w[:, None] * w[None, :])).flatten(), 0))


def test_pyros_capture_recapture_model_as_written_matches_its_sum_and_trace_enum():
    """examples/capture_recapture/cjs.py: ``model_1(capture_history, sex)`` with ``sex=None``,
    the guide ``AutoDiagonalNormal(poutine.block(model, expose_fn=...))`` and TraceEnum_ELBO as
    there; no data_plate, no wrapper."""
    history = capture_histories()
    guide = AutoDiagonalNormal(poutine.block(
        cjs_model_1, expose_fn=lambda msg: msg["name"][0:3] in ["phi", "rho"]))
    svi = SVI(cjs_model_1, guide, pyro.optim.Adam({"lr": 0.05}),
              TraceEnum_ELBO(max_plate_nesting=1, num_particles=20, vectorize_particles=True))
    for _ in range(150):
        svi.step(history, None)
    d = evaluate(cjs_model_1, guide, history, None, num_samples=2000)
    assert d.unit == "data set" and d.total.num_data == 30 and d.total.khat < 0.7
    assert any("z_0" in note and "summed out exactly" in note for note in d.notes)
    # The example's `first_capture_mask |= ...` rewrites the masks its sites hold: said.
    assert any("'z_1'" in note and "changed after they were drawn" in note for note in d.notes)
    assert within(d.total.log_evidence, cjs_evidence(history), d.total.log_evidence_se)
    pyro_elbo, pyro_se = enumerated_elbo(cjs_model_1, guide, history, None, repeats=5,
                                         particles=400, vectorize=True)
    assert within(d.total.elbo, pyro_elbo, math.hypot(d.total.elbo_se, pyro_se))
