"""Each run its own parameters: pairs written with plain ``pyro.param`` (Pyro's global param
store, by name) loaded and compared side by side, in either order, give each run's own numbers."""

import pyro
import pytest
import torch

from elbogap import evaluate, load_run
from elbogap.runs.compare import compare
from tests.cli.test_scripts import run

# A user's pair, as the Pyro tutorials write one: every parameter a named pyro.param.
PARAM_PAIR = '''
import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints


def make_pair(data_dim, latent_dim=2):
    """z ~ N(0, I), x | z ~ N(W z + b, s^2 I);  q(z | x) = N(A x + c, diag(t^2))."""

    def model(x):
        W = pyro.param("W", 0.1 * torch.randn(data_dim, latent_dim))
        b = pyro.param("b", torch.zeros(data_dim))
        s = pyro.param("s", torch.ones(()), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + b, s).to_event(1), obs=x)

    def guide(x):
        A = pyro.param("A", torch.zeros(latent_dim, data_dim))
        c = pyro.param("c", torch.zeros(latent_dim))
        t = pyro.param("t", torch.ones(latent_dim), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ A.T + c, t).to_event(1))

    return model, guide


def make_model(data_dim, latent_dim=2):
    """The same model alone: its guide is Pyro's AutoNormal (a PyroModule whose parameters
    Pyro's global store holds by name, AutoNormal.locs.z and so on)."""
    return make_pair(data_dim, latent_dim)[0]
'''

K, POINTS, SEED = 100, 40, 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of each pair, of different latent sizes and training lengths."""
    root = tmp_path_factory.mktemp("param_runs")
    (root / "pair.py").write_text(PARAM_PAIR)
    made = {}
    for factory in ("make_pair", "make_model"):
        for latent, epochs in ((2, 3), (4, 1)):
            out = root / f"{factory}-{latent}"
            result = run("fit.py", "--model", f"{root / 'pair.py'}:{factory}", "--latent-dim",
                         str(latent), "--epochs", str(epochs),
                         "--eval-samples", "10", "--eval-points", "20", "--no-progress",
                         # AutoNormal holds a location per training point: no minibatches.
                         *(["--batch-size", "1500"] if factory == "make_model" else []),
                         "--out", str(out))
            assert result.returncode == 0, result.stderr
            made[factory, latent] = out
    return made


def _elbo_and_evidence(run_) -> tuple[float, float]:
    pyro.set_rng_seed(SEED)
    d = evaluate(run_.model, run_.guide, run_.points(POINTS), num_samples=K, batch_size=100)
    return d.elbo.mean().item(), d.log_evidence.mean().item()


@pytest.mark.parametrize("factory", ["make_pair", "make_model"])
def test_runs_loaded_side_by_side_each_evaluate_on_their_own_parameters(runs, factory):
    small, large = runs[factory, 2], runs[factory, 4]
    alone = {}
    for d in (small, large):
        alone[d] = _elbo_and_evidence(load_run(d, trust_model_file=True))
    assert alone[small] != alone[large]
    for first, second in ((small, large), (large, small)):
        a = load_run(first, trust_model_file=True)
        assert _elbo_and_evidence(a) == alone[first]
        b = load_run(second, trust_model_file=True)
        assert _elbo_and_evidence(b) == alone[second]
        assert _elbo_and_evidence(a) == alone[first]


def test_compare_in_either_order_gives_each_run_its_numbers_alone(runs):
    small, large = runs["make_pair", 2], runs["make_pair", 4]
    alone = {}
    for d in (small, large):
        r = load_run(d, trust_model_file=True)
        pyro.set_rng_seed(SEED)
        alone[d.name] = evaluate(r.model, r.guide, r.points(POINTS), num_samples=K,
                                 batch_size=100).summary()["elbo"]["mean"]
    for order in ((small, large), (large, small)):
        c = compare(list(order), num_samples=K, points=POINTS, seed=SEED, trust_model_file=True)
        assert {name: s["elbo"]["mean"] for name, s in zip(c.names, c.summaries, strict=True)} == alone


def test_a_run_leaves_the_users_own_param_store_as_it_was(runs):
    pyro.clear_param_store()
    mine = pyro.param("W", torch.zeros(3))
    r = load_run(runs["make_pair", 4], trust_model_file=True)
    _elbo_and_evidence(r)
    assert list(pyro.get_param_store().keys()) == ["W"] and pyro.param("W") is not None
    assert pyro.get_param_store()._params["W"] is mine.unconstrained()
    with r.parameters():
        assert pyro.param("W").shape == (64, 4)  # the run's: digits' 64 pixels, 4 latents
    assert pyro.param("W").shape == (3,)
    pyro.clear_param_store()
