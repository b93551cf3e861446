"""Each shortcut of evaluate is checked on the pair at hand, or not taken: six small programs, each
showing the mechanism of a number that used to come out wrong without a word."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, config_enumerate
from pyro.infer.autoguide import AutoDelta
from torch import nn
from torch.special import digamma

from elbogap import ConventionError, annealed_evidence, evaluate, posterior_predictive
from elbogap.diagnostics.reference import reference_terms
from elbogap.foundations.conventions import inspect_pair


def plain_elbo(model, guide, x, num_particles):
    """The ELBO of the data set by Pyro's own Trace_ELBO, particle by particle, and its SE."""
    elbo = Trace_ELBO()
    draws = torch.tensor([-elbo.loss(model, guide, x) for _ in range(num_particles)],
                         dtype=torch.float64)
    return draws.mean().item(), draws.std().item() / math.sqrt(num_particles)


# ---- 1. vectorized particles judged by shapes only --------------------------------------------

V = 6  # as many features as data points below: [K, N, V] passes every shape check


def softmax_model(x):
    """z_n ~ N(0, I_2); x_n ~ N(log_softmax(W z_n), 0.5) over V categories, normalized along
    dim=1, the categories of a [N, V] batch (and the data points of a [K, N, V] one)."""
    w = pyro.param("w", torch.linspace(-1, 1, 2 * V).reshape(2, V))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(torch.log_softmax(z @ w, dim=1), 0.5).to_event(1), obs=x)


def softmax_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x[:, :2] * 0.1, 0.8).to_event(1))


def test_a_decoder_normalizing_a_fixed_axis_is_not_broadcast_but_vmapped():
    x = torch.log_softmax(torch.randn(V, V), 1)
    layout = inspect_pair(softmax_model, softmax_guide, x)
    assert not layout.vectorized
    d = evaluate(softmax_model, softmax_guide, x, num_samples=2000)
    assert any("vectorized with torch.func.vmap" in note for note in d.notes)
    ours, ours_se = d.total.elbo, d.total.elbo_se
    pyros, pyros_se = plain_elbo(softmax_model, softmax_guide, x, 2000)
    assert abs(ours - pyros) < 4 * math.hypot(ours_se, pyros_se)


# ---- 2. reconstruction is E_q[log p(x | z)], not the ELBO plus the KL ------------------------

def poisson_gamma(prior_rate):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Gamma(x.new_full((), 2.0), prior_rate))
            pyro.sample("x", dist.Poisson(z), obs=x)
    return model


def gamma_guide(x):
    """q(z_n) = Gamma(0.2, 0.2 / (x_n + 1)): heavy-tailed log-ratios to the prior."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Gamma(0.2 + 0 * x, 0.2 / (x + 1)))


def test_reconstruction_is_the_plain_mean_of_the_likelihood_with_its_own_error():
    x = torch.tensor([0., 1., 3., 7., 12., 30., 60., 150.])
    shape, rate = 0.2 + 0 * x, 0.2 / (x + 1)
    exact = x * (digamma(shape) - rate.log()) - shape / rate - torch.lgamma(x + 1)
    runs = []
    for prior_rate in (0.5, 0.05):
        pyro.set_rng_seed(3)
        runs.append(evaluate(poisson_gamma(prior_rate), gamma_guide, x, num_samples=500))
    # The prior changes the KL and the ELBO, never E_q[log p(x | z)]: the same draws give the
    # same reconstruction, digit for digit.
    assert not torch.allclose(runs[0].elbo, runs[1].elbo)
    torch.testing.assert_close(runs[0].reconstruction, runs[1].reconstruction, rtol=0, atol=1e-9)
    d = runs[0]
    z = (d.reconstruction - exact.double()) / d.reconstruction_se
    assert z.abs().max() < 4, z
    assert d.summary()["reconstruction_mc_se"] > 0


# ---- 3. a closed-form KL where the guide's order makes it biased -----------------------------

def chained_model(x):
    """a_n ~ N(0, 1), z_n ~ N(a_n, 1), x_n ~ N(z_n, 0.5): a is a prior parent of z."""
    with pyro.plate("data", x.shape[0]):
        a = pyro.sample("a", dist.Normal(x.new_zeros(()), 1.0))
        z = pyro.sample("z", dist.Normal(a, 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)


def reversed_guide(x):
    """z first, then its prior parent a conditioned on it (a semi-supervised guide's order)."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.8 * x, 1.0))
        pyro.sample("a", dist.Normal(0.5 * z, 0.7))


def test_a_closed_form_kl_is_used_only_where_the_guides_order_makes_it_valid():
    """KL(q(z) || N(a, 1)) at an a drawn given z is off by the variance of q(z) / 2 per point
    (here 0.5): at K = 15 draws, below the control variate, that is the whole ELBO's error."""
    x = torch.linspace(-3, 3, 300)
    layout = inspect_pair(chained_model, reversed_guide, x)
    assert layout.closed_form == {"a"}
    d = evaluate(chained_model, reversed_guide, x, num_samples=15)
    assert d.kl_method == {"a": "analytic", "z": "monte-carlo"}
    assert any("the KL of site(s) ['z'] is Monte Carlo" in note for note in d.notes)
    pyros, pyros_se = plain_elbo(chained_model, reversed_guide, x, 2000)
    assert abs(d.total.elbo - pyros) < 4 * math.hypot(d.total.elbo_se, pyros_se)


# ---- 4. the guide's own observed sites and factors are no part of q --------------------------

def linear_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def make_guide(classifier: bool):
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.5 * x, 0.8))
            if classifier:
                # A classification loss in the guide, as semi-supervised programs add one.
                pyro.factor("classify", -3.0 * (z - x).pow(2), has_rsample=True)
                pyro.sample("y", dist.Bernoulli(logits=z), obs=(x > 0).float())
    return guide


def test_a_factor_and_an_observed_site_in_the_guide_are_kept_apart():
    x = torch.linspace(-2, 2, 30)
    runs = []
    for classifier in (False, True):
        pyro.set_rng_seed(0)
        runs.append(evaluate(linear_model, make_guide(classifier), x, num_samples=500))
    plain, with_factor = runs
    for name in ("elbo", "reconstruction", "kl_prior", "log_evidence", "evidence_gap"):
        torch.testing.assert_close(getattr(with_factor, name), getattr(plain, name))
    assert plain.guide_observed is None
    assert with_factor.guide_observed.mean() < -1
    assert any("['classify', 'y'] are observed or factors" in n for n in with_factor.notes)


# ---- 5. the posterior predictive of a model without a data plate ----------------------------

def whole_model(x):
    """theta ~ N(0, 1); x | theta ~ N(theta 1, I): x observed as one whole, no plate."""
    theta = pyro.sample("theta", dist.Normal(torch.tensor(0.0), 1.0))
    pyro.sample("x", dist.Normal(theta.unsqueeze(-1).expand(x.shape), 1.0).to_event(1), obs=x)


def whole_guide(x):
    pyro.sample("theta", dist.Normal(torch.tensor(0.4), 0.3))


def test_the_posterior_predictive_of_a_model_without_a_data_plate_is_of_x_as_a_whole():
    x_new = torch.tensor([0.2, 0.9, -0.4])
    p = posterior_predictive(whole_model, whole_guide, x_new, num_samples=4000)
    # theta ~ N(0.4, 0.3^2): x_new ~ N(0.4 1, I + 0.09 11^T).
    exact = dist.MultivariateNormal(torch.full((3,), 0.4),
                                    torch.eye(3) + 0.09 * torch.ones(3, 3)).log_prob(x_new)
    assert p.log_density.shape == (1,) and p.whole
    assert abs(p.log_density[0] - exact) < 4 * p.log_density_se[0] + 1e-3
    assert "as one observation" in p.summary()["name"]


# ---- 6. a mode the guide never reaches ------------------------------------------------------

TRUE_MEANS = (-2.0, 2.0)


def mixture_model(x):
    """mu ~ N(0, 3^2 I_2); x_n ~ 1/2 N(mu_0, 1) + 1/2 N(mu_1, 1): the labels can switch, and the
    posterior of mu has two modes.  Written with mu's coordinates indexed, as the mixture
    programs this came from were: it does not broadcast over a particle dimension."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 3.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        log_like = torch.stack([dist.Normal(mu[0], 1.0).log_prob(x),
                                dist.Normal(mu[1], 1.0).log_prob(x)])
        pyro.factor("x", torch.logsumexp(log_like, 0) - math.log(2))


def mixture_guide(x):
    """q(mu) on one labelling only: the posterior's mode at (-2, 2), not its mirror image."""
    loc = pyro.param("mu_loc", torch.tensor(TRUE_MEANS))
    scale = pyro.param("mu_scale", torch.full((2,), 0.3), constraint=dist.constraints.positive)
    pyro.sample("mu", dist.Normal(loc, scale).to_event(1))


def mixture_evidence(x: torch.Tensor) -> float:
    """log p(x) by quadrature over mu on a grid fine enough for both modes."""
    grid = torch.linspace(-9, 9, 1201, dtype=torch.float64)
    m0, m1 = torch.meshgrid(grid, grid, indexing="ij")
    xs = x.double().reshape(-1, 1, 1)
    log_like = (torch.logaddexp(dist.Normal(m0, 1.0).log_prob(xs),
                                dist.Normal(m1, 1.0).log_prob(xs)) - math.log(2)).sum(0)
    log_prior = dist.Normal(0.0, 3.0).log_prob(m0) + dist.Normal(0.0, 3.0).log_prob(m1)
    step = (grid[1] - grid[0]).item()
    return (torch.logsumexp((log_like + log_prior).flatten(), 0) + 2 * math.log(step)).item()


@pytest.fixture(scope="module")
def mixture_data():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(2, (24,), generator=g)
    x = torch.tensor(TRUE_MEANS)[labels] + torch.randn(24, generator=g)
    return x, mixture_evidence(x)


def test_importance_sampling_misses_a_mode_that_k_hat_cannot_see(mixture_data):
    x, exact = mixture_data
    d = evaluate(mixture_model, mixture_guide, x, num_samples=4000)
    t = d.total
    assert t.khat < 0.7  # the weights of the mode q visits are well behaved...
    # ...and log p(x) is half the mass, log 2, short: many standard errors below exact.
    assert abs(t.log_evidence - (exact - math.log(2))) < 0.1
    assert exact - t.log_evidence > 4 * t.log_evidence_se
    assert "cannot see a posterior mode the guide never reaches" in d.summary()["khat"]["verdict"]


@pytest.mark.slow
def test_defensive_importance_sampling_finds_the_other_mode(mixture_data):
    x, exact = mixture_data
    d = evaluate(mixture_model, mixture_guide, x, num_samples=10000, defensive=0.5)
    t = d.total
    assert abs(t.log_evidence - exact) < 4 * t.log_evidence_se
    assert any("defensive importance sampling" in note for note in d.notes)


@pytest.mark.slow
def test_ais_from_the_prior_vmapped_over_its_chains_finds_both_modes(mixture_data):
    x, exact = mixture_data
    a = annealed_evidence(mixture_model, mixture_guide, x, num_chains=16, num_steps=120,
                          start="prior")
    assert a.unit == "data set"
    assert abs(a.log_evidence[0].item() - exact) < max(4 * a.log_evidence_se[0].item(), 0.1)


def test_ais_vmapped_over_chains_equals_ais_in_a_particle_plate_on_an_exact_evidence():
    """The same linear-Gaussian pair, written to broadcast and not (its chains then under
    vmap): both paths of AIS within their SE of the exact log p(x)."""
    x = torch.linspace(-2, 2, 6)
    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x)

    def indexed_model(x):  # the particle dimension is lost by x's own shape in the plate
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape), 1.0))
            pyro.sample("x", dist.Normal(z.reshape(x.shape), 1.0), obs=x)

    guide = make_guide(False)
    assert inspect_pair(linear_model, guide, x).vectorized
    assert not inspect_pair(indexed_model, guide, x).vectorized
    for model in (linear_model, indexed_model):
        a = annealed_evidence(model, guide, x, num_chains=16, num_steps=100)
        assert not a.notes  # no chain went one by one
        error = (a.log_evidence - exact).mean().item()
        assert abs(error) < 4 * a.log_evidence_se.pow(2).mean().sqrt().item() / math.sqrt(6)


# ---- modules left in training mode, scales, enumeration, point masses -----------------------

class DropoutEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 8), nn.Dropout(0.5), nn.Linear(8, 1))

    def guide(self, x):
        pyro.module("encoder", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.net(x.unsqueeze(-1)).squeeze(-1), 0.8))


def test_modules_left_in_training_mode_are_evaluated_in_evaluation_mode():
    encoder = DropoutEncoder()
    assert encoder.training
    x = torch.linspace(-2, 2, 20)
    runs = []
    for _ in range(2):
        pyro.set_rng_seed(0)
        runs.append(evaluate(linear_model, encoder.guide, x, num_samples=300))
    assert encoder.training and encoder.net[1].training  # put back as it was
    torch.testing.assert_close(runs[0].kl_prior, runs[1].kl_prior)
    assert any("evaluated in evaluation mode" in note and "Dropout" in note
               for note in runs[0].notes)
    encoder.eval()
    pyro.set_rng_seed(0)
    in_eval = evaluate(linear_model, encoder.guide, x, num_samples=300)
    torch.testing.assert_close(in_eval.log_evidence, runs[0].log_evidence)
    encoder.train()
    kept = evaluate(linear_model, encoder.guide, x, num_samples=300, train_mode=True)
    assert any("left in training mode" in note for note in kept.notes)


def test_a_scale_of_the_users_is_reported_and_the_density_is_unscaled():
    def scaled_model(x):
        with pyro.plate("data", x.shape[0]), pyro.poutine.scale(scale=0.25):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    x = torch.linspace(-2, 2, 10)
    pyro.set_rng_seed(0)
    scaled = evaluate(scaled_model, make_guide(False), x, num_samples=200)
    pyro.set_rng_seed(0)
    plain = evaluate(linear_model, make_guide(False), x, num_samples=200)
    torch.testing.assert_close(scaled.log_evidence, plain.log_evidence)
    assert any("['z', 'x'] carry a scale of their own" in note for note in scaled.notes)


def mixture_prior(x):
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Bernoulli(x.new_full((), 0.5)))
        z = pyro.sample("z", dist.Normal(2.0 * c - 1.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


enumerated_model = config_enumerate(mixture_prior)


def test_what_enumeration_cannot_sum_and_point_masses_are_refused_by_their_reason():
    x = torch.linspace(-2, 2, 10)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.5 * x, 0.8))

    # z's prior is a mixture over c: no KL to a prior per site.
    with pytest.raises(ConventionError, match=r"\['z'\] have a prior that depends on "
                                              r"enumerated site\(s\) \['c'\]"):
        evaluate(enumerated_model, guide, x, num_samples=10)
    # Sequential enumeration would run the model once per value: not done, said so.
    sequential = config_enumerate(mixture_prior, "sequential")
    with pytest.raises(ConventionError, match=r"\['c'\] are marked for enumeration "
                                              r"\(infer=\{'enumerate': \['sequential'\]\}\)"):
        evaluate(sequential, guide, x, num_samples=10)
    # AutoDelta leaves the enumerated site out too: the point mass is what to say first.
    with pytest.raises(ConventionError, match="point mass"):
        evaluate(enumerated_model, AutoDelta(pyro.poutine.block(enumerated_model, hide=["c"])),
                 x, num_samples=10)


def test_the_reference_estimator_is_pyros_elbo():
    """The yardstick itself: its ELBO of a data set is Trace_ELBO's, particle for particle."""
    x = torch.linspace(-2, 2, 12)
    guide = make_guide(False)
    pyro.set_rng_seed(1)
    ref = reference_terms(linear_model, guide, x, num_samples=50)
    pyro.set_rng_seed(1)
    pyros = [-Trace_ELBO().loss(linear_model, guide, x) for _ in range(50)]
    torch.testing.assert_close(ref.log_weight.sum(1), torch.tensor(pyros, dtype=torch.float64),
                               rtol=1e-6, atol=1e-4)
