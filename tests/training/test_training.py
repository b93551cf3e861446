"""fit() on the bundled digits, minibatch scaling, checkpoints, and the estimators on a trained VAE."""

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from elbogap.data.readers import load_digits
from elbogap.diagnostics.evaluation import evaluate
from elbogap.foundations.errors import ConfigError
from elbogap.guides.mean_field import MeanFieldGuide
from elbogap.models.vae import VAE
from elbogap.training.checkpoint import load_checkpoint
from elbogap.training.elbo_step import ElboStep
from elbogap.training.fitting import CHECKPOINT, METRICS, FitOptions, fit
from elbogap.training.minibatch import scale_data_plate


def digits_pair():
    data = load_digits()
    return data, VAE(data.data_dim, 10, (200,)), MeanFieldGuide(data.data_dim, 10, (200,))


@pytest.fixture(scope="module")
def trained():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    data, vae, enc = digits_pair()
    options = FitOptions(epochs=40, eval_every=20, eval_samples=20, eval_points=50,
                         progress=False)
    result = fit(vae.model, enc.guide, data, options)
    return data, vae, enc, result


def test_training_improves_the_test_elbo(trained):
    _, _, _, result = trained
    first, last = result.history[0]["test_elbo"], result.history[-1]["test_elbo"]
    # Untrained, the digits cost about 44 nats (64 pixels x log 2); trained, under 25.
    assert last > first + 5
    assert last > -25
    assert [r["epoch"] for r in result.history if "diagnostics" in r] == [20, 40]


def test_log_evidence_bounds_elbo_and_grows_with_k(trained):
    """IWAE monotonicity: E[log mean of K weights] grows with K.

    From one set of 1000 draws per point, the K-sample estimate is averaged over the 1000/K
    disjoint blocks of K draws: the same expectation with far less noise, so that differences of
    a few hundredths of a nat are resolved.
    """
    data, vae, enc, _ = trained
    x = data.test
    pyro.set_rng_seed(1)
    d = evaluate(vae.model, enc.guide, x, num_samples=1000, keep_log_weights=True)
    log_w = d.log_weights
    torch.testing.assert_close(torch.logsumexp(log_w, 0) - math.log(1000), d.log_evidence)
    estimates = {
        k: (torch.logsumexp(log_w.reshape(1000 // k, k, -1), 1) - math.log(k)).mean(0)
        for k in (1, 10, 100, 1000)
    }
    # K = 1: the mean log-weight is an unbiased ELBO estimate, as is evaluate's ELBO.
    diff = estimates[1] - d.elbo
    assert abs(diff.mean().item()) < 4 * diff.std().item() / math.sqrt(len(x))
    for small, large in ((1, 10), (10, 100), (100, 1000)):
        step = estimates[large] - estimates[small]
        se = step.std().item() / math.sqrt(len(x))
        assert step.mean().item() > 4 * se, (small, large, step.mean().item(), se)
    assert d.log_evidence.mean() > d.elbo.mean()
    assert (d.evidence_gap.mean() > 0).item()


def test_minibatch_scaling_multiplies_data_plate_sites_only():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    trace = poutine.trace(scale_data_plate(model, "data", 100)).get_trace(torch.zeros(10))
    assert trace.nodes["x"]["scale"] == 10.0
    assert trace.nodes["mu"]["scale"] == 1.0


def test_fit_writes_metrics_and_a_checkpoint_that_restores(tmp_path):
    data, vae, enc = digits_pair()
    options = FitOptions(epochs=2, eval_every=1, eval_samples=5, eval_points=20, progress=False)
    fit(vae.model, enc.guide, data, options, run_dir=tmp_path)
    lines = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert {"train_elbo", "test_elbo", "diagnostics"} <= set(lines[-1])
    before = evaluate(vae.model, enc.guide, data.test, num_samples=1).kl_prior

    pyro.clear_param_store()
    _, vae2, enc2 = digits_pair()
    assert not torch.allclose(
        evaluate(vae2.model, enc2.guide, data.test, num_samples=1).kl_prior, before
    )
    state = load_checkpoint(tmp_path / CHECKPOINT, vae2.model, enc2.guide, data.test[:2])
    assert state["epoch"] == 2
    after = evaluate(vae2.model, enc2.guide, data.test, num_samples=1).kl_prior
    torch.testing.assert_close(after, before)


def test_checkpoint_of_another_pair_is_refused(tmp_path):
    data, vae, enc = digits_pair()
    fit(vae.model, enc.guide, data, FitOptions(epochs=1, progress=False), run_dir=tmp_path)
    pyro.clear_param_store()
    other_vae, other_enc = VAE(64, 5, (20,)), MeanFieldGuide(64, 5, (20,))
    with pytest.raises(ConfigError, match="has shape .* in the checkpoint"):
        load_checkpoint(tmp_path / CHECKPOINT, other_vae.model, other_enc.guide, data.test[:2])


@pytest.mark.parametrize(
    "field, value, message",
    [("epochs", 0, "^epochs must be a positive integer"),
     ("lr", -1.0, "^lr must be a positive number"),
     ("batch_size", 10**6, "^batch_size 1000000 is larger than the training set"),
     ("elbo", "renyi", "^elbo must be one of")],
)
def test_bad_fit_options_are_named(field, value, message):
    data, vae, enc = digits_pair()
    options = FitOptions(progress=False)
    setattr(options, field, value)
    with pytest.raises(ConfigError, match=message):
        fit(vae.model, enc.guide, data, options)


@pytest.mark.parametrize("jit", [True, False])
def test_elbo_step_is_svi_with_trace_elbo(jit):
    """Same seed and parameters: the same loss as pyro.infer.SVI, and the same Adam update,
    also once the steps replay a recording (step 3 verifies it, 4-6 replay it)."""
    data = load_digits()
    x = data.train[:64]
    results = []
    for use_svi in (True, False):
        pyro.clear_param_store()
        torch.manual_seed(0)
        vae, enc = VAE(64, 5, (32,)), MeanFieldGuide(64, 5, (32,))
        pyro.set_rng_seed(1)
        if use_svi:
            svi = pyro.infer.SVI(scale_data_plate(vae.model, "data", 1500),
                                 scale_data_plate(enc.guide, "data", 1500),
                                 pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO())
            losses = [svi.step(x) for _ in range(6)]
        else:
            step = ElboStep(vae.model, enc.guide, 1500, lr=0.01, jit=jit)
            losses = [step(x) for _ in range(6)]
            assert step.compiled.enabled == jit, step.compiled.reason
        params = {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}
        results.append((losses, params))
    (svi_losses, svi_params), (our_losses, our_params) = results
    assert svi_losses == pytest.approx(our_losses, rel=1e-6)
    assert svi_params.keys() == our_params.keys()
    for name in svi_params:
        torch.testing.assert_close(our_params[name], svi_params[name], rtol=1e-5, atol=1e-6)


def test_optimizer_state_survives_a_checkpoint(tmp_path):
    data, vae, enc = digits_pair()
    result = fit(vae.model, enc.guide, data, FitOptions(epochs=1, progress=False), tmp_path)
    saved = result.step.state_dict()
    pyro.clear_param_store()
    _, vae2, enc2 = digits_pair()
    state = load_checkpoint(tmp_path / CHECKPOINT, vae2.model, enc2.guide, data.test[:2])
    step = ElboStep(vae2.model, enc2.guide, 1500, lr=1e-3)
    step.load_state_dict(state["optimizer"])
    step(data.train[:100])
    assert step.names == saved["names"]
    first = step.optimizer.state_dict()["state"][0]["step"]
    assert float(first) == float(saved["adam"]["state"][0]["step"]) + 1
