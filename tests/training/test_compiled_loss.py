"""The recorded loss: used only where it is faithful, the eager loss everywhere else."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from elbogap.data.readers import load_digits
from elbogap.guides.mean_field import MeanFieldGuide
from elbogap.models.vae import VAE
from elbogap.training.checkpoint import rng_preserved
from elbogap.training.elbo_step import ElboStep
from elbogap.training.fitting import FitOptions, fit

X = torch.bernoulli(torch.full((40, 12), 0.3), generator=torch.Generator().manual_seed(0))


def run(model, guide, batches, jit, elbo="trace"):
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    step = ElboStep(model, guide, 400, lr=0.01, elbo=elbo, jit=jit)
    losses = [step(b) for b in batches]
    params = {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}
    return step, losses, params


def assert_same_run(a, b):
    (_, losses_a, params_a), (_, losses_b, params_b) = a, b
    assert losses_a == pytest.approx(losses_b, rel=1e-6)
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
def test_replay_equals_eager_across_minibatch_shapes(elbo):
    """Batches of 16, 16, 16, 8, 16, 8, 16, 8: the short batch gets its own recording, and the
    run is the eager run step for step."""
    torch.manual_seed(0)
    vae, enc = VAE(12, 3, (8,)), MeanFieldGuide(12, 3, (8,))
    batches = [X[:16], X[16:32], X[:16], X[32:], X[16:32], X[32:], X[:16], X[32:]]
    state = {k: v.clone() for k, v in {**vae.state_dict(), **enc.state_dict()}.items()}
    recorded = run(vae.model, enc.guide, batches, jit=True, elbo=elbo)
    vae.load_state_dict({k: v for k, v in state.items() if k in vae.state_dict()})
    enc.load_state_dict({k: v for k, v in state.items() if k in enc.state_dict()})
    eager = run(vae.model, enc.guide, batches, jit=False, elbo=elbo)
    step = recorded[0]
    assert step.compiled.enabled, step.compiled.reason
    assert {key[0][0][0]: n for key, n in step.compiled._checks.items()} == {(16, 12): 2, (8, 12): 2}
    assert_same_run(recorded, eager)


def guide(x):
    loc = pyro.param("loc", torch.zeros(12))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))


def branching_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(12), 1.0).to_event(1))
        if x.mean() > 0.3:  # a branch on the data's values: a recording would freeze it
            z = 2 * z
        pyro.sample("x", dist.Bernoulli(logits=z).to_event(1), obs=x)


COUNTER = {"calls": 0}


def stateful_model(x):
    # Python state the tracer cannot see: a recording would hold the first value forever.
    COUNTER["calls"] += 1
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(12), 1.0).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=z * COUNTER["calls"] / 10).to_event(1), obs=x)


def test_a_branch_on_data_values_keeps_the_eager_loss():
    batches = [X[:20], X[20:], X[:20], X[20:]]
    recorded = run(branching_model, guide, batches, jit=True)
    assert not recorded[0].compiled.enabled
    assert "test_compiled_loss.py" in recorded[0].compiled.reason
    assert_same_run(recorded, run(branching_model, guide, batches, jit=False))


def test_hidden_python_state_fails_verification_and_keeps_the_eager_loss():
    batches = [X[:20], X[20:], X[:20], X[20:], X[:20]]
    COUNTER["calls"] = 0
    recorded = run(stateful_model, guide, batches, jit=True)
    assert not recorded[0].compiled.enabled
    assert "differs from the eager" in recorded[0].compiled.reason
    # From the fallback on, a step is the eager step: the same loss for the same draws.
    step = recorded[0]
    with rng_preserved():
        calls = COUNTER["calls"]
        expected = step.eager_loss(X[:20]).item()
    COUNTER["calls"] = calls
    assert step(X[:20]) == pytest.approx(expected, rel=1e-6)


class AnnealedVAE(VAE):
    """A VAE whose KL weight is Python state, changed between epochs as annealing does."""

    def __init__(self):
        super().__init__(64, 4, (16,))
        self.kl_weight = 1.0

    def model(self, x):
        with poutine.scale(scale=self.kl_weight):
            super().model(x)


def test_python_state_changed_between_epochs_ends_the_recordings_before_a_stale_step():
    data = load_digits()
    histories, reasons = [], []
    for jit in (True, False):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        vae, enc = AnnealedVAE(), MeanFieldGuide(64, 4, (16,))

        def anneal(record, vae=vae):
            vae.kl_weight = 0.5

        options = FitOptions(epochs=3, eval_every=3, eval_samples=5, progress=False, jit=jit)
        result = fit(vae.model, enc.guide, data, options, on_epoch=anneal)
        histories.append([r["train_elbo"] for r in result.history])
        reasons.append(result.step.compiled.reason)
    assert "differs from the eager" in reasons[0]
    assert histories[0] == pytest.approx(histories[1], rel=1e-5)


def test_fit_says_once_why_it_trains_eagerly(capsys):
    data = load_digits()
    vae, enc = VAE(64, 4, (16,)), MeanFieldGuide(64, 4, (16,))

    def model(x):
        if x.mean() > 0.5:  # a branch on the data's values
            x = 1 - x
        vae.model(x)

    pyro.clear_param_store()
    fit(model, enc.guide, data, FitOptions(epochs=2, eval_every=2, eval_samples=5, progress=False))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(lines) == 1 and "test_compiled_loss.py" in lines[0], lines
