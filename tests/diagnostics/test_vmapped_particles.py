"""Pairs that do not broadcast over a leading particle dimension, as users write them, vectorized
with ``torch.func.vmap``: the same terms as the plain particle-by-particle passes at the same
draws, and a loop with the cause named where vmap cannot take the program.  Evaluation, AIS
and training (Trace_ELBO and the importance-weighted bound with several particles)."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.infer.autoguide import AutoNormal

from elbogap import FitOptions, annealed_evidence, evaluate, fit
from elbogap.diagnostics import ais
from elbogap.diagnostics.passes import pass_layout
from elbogap.diagnostics.terms import particle_terms
from elbogap.diagnostics.vmapped_pass import vmapped_terms
from elbogap.foundations.data_plate import program_pair
from elbogap.foundations.particle_vmap import vmapped
from elbogap.foundations.traces import trace_pair
from elbogap.training.vmapped_elbo import VmappedTraceELBO
from tests.real_programs import bayesian_regression, cvae
from tests.real_programs.test_real_programs import dataset


def regression_pair(n=40):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    features, y = bayesian_regression.data(n)
    model = bayesian_regression.BayesianRegression()
    guide = AutoNormal(model)
    guide(features, y)
    return model, guide, (features, y)


def bound(model, guide, args):
    program = program_pair(model, guide, args, {}, None)
    return program.model, program.guide, program.data, program.data_plate


def test_the_regression_tutorial_is_vmapped_with_the_loops_terms_at_the_same_draws():
    m, g, x, plate = bound(*regression_pair())
    with torch.no_grad():
        layout = pass_layout(m, g, x, plate)
        assert not layout.vectorized and layout.vmap is not None
        terms, draws, _ = vmapped_terms(m, g, x, layout, 25, plate)
        for j in range(25):
            plain = particle_terms(*trace_pair(m, g, x, replay_guide=draws.particle(j)),
                                   layout, plate, 1, x.shape[0])
            torch.testing.assert_close(terms.global_log_weight[j:j + 1], plain.global_log_weight)
            torch.testing.assert_close(terms.log_weight[j:j + 1], plain.log_weight)
            torch.testing.assert_close(terms.reconstruction[j:j + 1], plain.reconstruction)
            for name, term in plain.kl.items():
                assert terms.kl[name].method == term.method
                torch.testing.assert_close(terms.kl[name].value[j:j + 1], term.value)
    # The draws differ from particle to particle (each drew its own).
    assert all(v.unique(dim=0).shape[0] == 25 for v in draws.values.values())
    model, guide, args = regression_pair()
    d = evaluate(model, guide, *args, num_samples=300)
    assert any("vectorized with torch.func.vmap" in note for note in d.notes)


def item_model(x):
    """A Python float of a latent (``.item()``): vmap cannot batch it."""
    s = pyro.sample("s", dist.LogNormal(0.0, 0.5))
    scale = float(s.item())
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(0.0, scale), obs=x)


def branching_model(x):
    """Data-dependent Python control flow on a latent."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    loc = mu if mu > 0 else -mu
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def scalar_guide(name, family):
    def guide(x):
        pyro.sample(name, family)
    return guide


@pytest.mark.parametrize("model, guide, cause", [
    (item_model, scalar_guide("s", dist.LogNormal(0.1, 0.3)), ".item()"),
    (branching_model, scalar_guide("mu", dist.Normal(0.3, 0.5)), "data-dependent control flow"),
])
def test_what_vmap_cannot_take_goes_one_particle_at_a_time_naming_the_cause_and_line(
        model, guide, cause):
    x = torch.randn(12)
    d = evaluate(model, guide, x, num_samples=200)
    note = next(n for n in d.notes if "one particle at a time" in n)
    assert cause in note and f"{__file__}:" in note
    # The loop's numbers are the pair's: the ELBO against Pyro's own, per particle.
    elbo = pyro.infer.Trace_ELBO()
    pyros = torch.tensor([-elbo.loss(model, guide, x) for _ in range(400)], dtype=torch.float64)
    se = math.hypot(d.total.elbo_se, pyros.std().item() / 20)
    assert abs(d.total.elbo - pyros.mean().item()) < 4 * se


def test_ais_vmaps_its_chains_with_the_chain_by_chain_numbers():
    model, guide, args = regression_pair()
    # The same chains both ways: the comparison, not the convergence check, is tested here.
    vmapped_run = annealed_evidence(model, guide, *args, num_chains=4, num_steps=20, seed=3,
                                    start="prior", check_fraction=None)
    assert not vmapped_run.notes
    original = ais.VmappedPath.differs
    try:
        ais.VmappedPath.differs = lambda self: "forced for the test"
        looped = annealed_evidence(model, guide, *args, num_chains=4, num_steps=20, seed=3,
                                   start="prior", check_fraction=None)
    finally:
        ais.VmappedPath.differs = original
    assert "forced for the test" in looped.notes[0]
    torch.testing.assert_close(vmapped_run.log_weights, looped.log_weights, rtol=1e-5, atol=1e-4)


def test_ais_of_a_pair_vmap_cannot_take_goes_chain_by_chain_saying_why():
    x = torch.randn(10)
    result = annealed_evidence(item_model, scalar_guide("s", dist.LogNormal(0.1, 0.3)), x,
                               num_chains=3, num_steps=5, seed=0)
    assert torch.isfinite(result.log_evidence).all()
    assert ".item()" in result.notes[0] and "one by one" in result.notes[0]


def linear_pair(x, y, noise):
    """w ~ N(0, I_3) as a [1, 3] matrix, y_n ~ N(F.linear(x_n, w), noise): F.linear needs a
    matrix, so Pyro's particle plate cannot take it.  q(w) = N(m, exp(ls)^2)."""
    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(1, 3), 1.0).to_event(2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(F.linear(x, w).squeeze(-1), noise), obs=y)

    def guide(x, y):
        m = pyro.param("m", torch.tensor([[0.5, -0.2, 0.1]]))
        ls = pyro.param("ls", torch.full((1, 3), -0.7))
        pyro.sample("w", dist.Normal(m, ls.exp()).to_event(2))
    return model, guide


def exact_elbo(x, y, noise, m, ls):
    """E_q[log p(y | w)] - KL(q(w) || p(w)) in closed form."""
    v = (2 * ls).exp()
    fit_term = (y - x @ m[0]).pow(2) + x.pow(2) @ v[0]
    expected = (-0.5 * math.log(2 * math.pi * noise**2) - fit_term / (2 * noise**2)).sum()
    kl = 0.5 * (v + m.pow(2) - 1 - v.log()).sum()
    return expected - kl


def test_the_vmapped_trace_elbo_gradient_is_the_exact_elbos_within_its_error():
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    x = torch.randn(30, 3)
    y = x @ torch.tensor([1.0, -0.5, 0.3]) + 0.5 * torch.randn(30)
    model, guide = linear_pair(x, y, 0.5)
    loss = VmappedTraceELBO(500)
    assert loss.check(model, guide, x, y) is None
    m, ls = pyro.param("m"), pyro.param("ls")
    draws = []
    for _ in range(12):
        grads = torch.autograd.grad(loss.differentiable_loss(model, guide, x, y), [m, ls])
        draws.append(torch.cat([-g.flatten() for g in grads]))
    draws = torch.stack(draws).double()
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    m0, ls0 = m.detach().double().requires_grad_(), ls.detach().double().requires_grad_()
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(
        exact_elbo(x.double(), y.double(), 0.5, m0, ls0), [m0, ls0])])
    assert ((mean - exact).abs() < 4.5 * se + 1e-3 * exact.abs()).all(), (mean, exact, se)


@pytest.mark.parametrize("elbo", ["trace", "iwae"])
def test_training_with_several_particles_vmaps_a_pair_that_does_not_broadcast(elbo):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    net = cvae.CVAE()
    result = fit(net.model, net.guide, dataset(*cvae.data(40)),
                 FitOptions(epochs=2, batch_size=8, num_particles=4, elbo=elbo,
                            eval_samples=10, progress=False))
    record = result.history[-1]
    assert math.isfinite(record["train_objective"])
    assert "vectorized with torch.func.vmap" in record["particles"]


def test_training_a_pair_vmap_cannot_take_loops_over_pyros_particles_saying_why():
    pyro.clear_param_store()
    x = torch.randn(20)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("s", dist.LogNormal(loc, 0.3))

    data = dataset(x)
    result = fit(item_model, guide, data, FitOptions(epochs=1, batch_size=8, num_particles=3,
                                                      eval_samples=5, progress=False))
    note = result.history[-1]["particles"]
    assert "drawn one by one" in note and ".item()" in note


def test_samplers_replaced_under_vmap_draw_the_distributions_they_replace():
    """torch's Normal and Dirichlet samplers are swapped for ones vmap can batch: the pair check
    compares terms at the same draws, so the draws' distribution is checked here."""
    n = 20_000

    def draw(_):
        return (dist.Normal(1.0, 2.0).rsample(), dist.Dirichlet(torch.tensor([3.0, 4.0])).rsample(),
                dist.MultivariateNormal(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.5, 2.0]]))
                .rsample())

    pyro.set_rng_seed(0)
    normal, dirichlet, mvn = vmapped(draw, n, None, "different")
    assert normal.unique().numel() > 0.99 * n  # each particle its own (float32 ties aside)
    for values, mean, var in ((normal, torch.tensor(1.0), torch.tensor(4.0)),
                              (dirichlet[:, 0], torch.tensor(3 / 7), torch.tensor(12 / 392)),
                              (mvn[:, 1], torch.tensor(0.0), torch.tensor(2.0))):
        assert abs(values.mean() - mean) < 4 * (var / n).sqrt()
        # Var of the sample variance of a near-normal variable: about 2 var^2 / n.
        assert abs(values.var() - var) < 4 * var * math.sqrt(3 / n)
    assert abs(torch.corrcoef(mvn.T)[0, 1] - 0.5 / math.sqrt(2)) < 0.03


def gmm(data):
    """Pyro's GMM tutorial's model, its assignment drawn by the guide."""
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(2)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def gmm_guide(data):
    pyro.sample("weights", dist.Dirichlet(torch.tensor([3.0, 4.0])))
    pyro.sample("scale", dist.LogNormal(0.0, 0.3))
    with pyro.plate("components", 2):
        pyro.sample("locs", dist.Normal(torch.tensor([0.5, 11.0]), 0.5))
    with pyro.plate("data", len(data)):
        probs = torch.tensor([[0.9, 0.1]] * 2 + [[0.1, 0.9]] * (len(data) - 2))
        pyro.sample("assignment", dist.Categorical(probs))


def test_the_gmm_tutorial_with_the_assignment_in_the_guide_is_vmapped_and_agrees_with_pyro():
    data = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0])
    pyro.set_rng_seed(0)
    d = evaluate(gmm, gmm_guide, data, num_samples=2000)
    assert any("draws inside vmap" in note for note in d.notes)
    mirror = d.mirror_modes["mode_averaged"]
    assert mirror["num_samples"] == 1000  # under vmap, as in the particle plate
    elbo = pyro.infer.Trace_ELBO()
    pyros = torch.tensor([-elbo.loss(gmm, gmm_guide, data) for _ in range(2000)],
                         dtype=torch.float64)
    se = math.hypot(d.total.elbo_se, pyros.std().item() / math.sqrt(2000))
    assert abs(d.total.elbo - pyros.mean().item()) < 4 * se


def test_every_batch_of_a_pair_that_does_not_broadcast_is_vmapped_and_checked_once_per_shape(
        monkeypatch):
    """Per-point evaluation in batches: the later batches take vmap too (not one particle at a
    time), and the vmap check runs once per batch shape, not once per batch."""
    from elbogap.diagnostics import passes

    net = cvae.CVAE()
    xs, ys = cvae.data(40)
    loops, checks = [], []
    traced, check = passes.traced_particles, passes.with_vmap
    monkeypatch.setattr(passes, "traced_particles", lambda *a, **k: loops.append(a[4]) or
                        traced(*a, **k))
    monkeypatch.setattr(passes, "with_vmap", lambda *a: checks.append(a[2].shape[0]) or
                        check(*a))
    d = evaluate(net.model, net.guide, xs, ys, num_samples=30, batch_size=12)
    assert any("vectorized with torch.func.vmap" in n for n in d.notes)
    assert not [k for k in loops if k > 1]  # no batch went particle by particle
    assert sorted(checks) == [4, 12]  # batches of 12, 12, 12 and 4 rows
