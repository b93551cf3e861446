"""β and KL warm-up, TraceGraph_ELBO, learning-rate schedules, gradient clipping, early stopping."""

from __future__ import annotations

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.kl import kl_divergence
from pyro.infer import Trace_ELBO

from elbogap import ConfigError, FitOptions, fit, load_run
from elbogap.data.readers import load_digits
from elbogap.foundations.traces import trace_pair
from elbogap.guides.mean_field import MeanFieldGuide
from elbogap.models.vae import VAE
from elbogap.training.checkpoint import load_checkpoint
from elbogap.training.elbo_step import ElboStep, TraceGraphELBO
from elbogap.training.kl_weight import KLSchedule
from elbogap.training.schedule import LearningRateSchedule

X = torch.bernoulli(torch.full((40, 12), 0.3), generator=torch.Generator().manual_seed(0))


def small_pair(seed=0):
    torch.manual_seed(seed)
    return VAE(12, 3, (8,)), MeanFieldGuide(12, 3, (8,))


def weighted_losses(elbo, weights):
    """The eager loss of one minibatch at several KL weights, every one with the same draws,
    and the traces of those draws."""
    vae, enc = small_pair()
    step = ElboStep(vae.model, enc.guide, 400, lr=0.01, elbo=elbo, jit=False, kl_weighted=True)
    losses = []
    with torch.no_grad():
        for w in weights:
            pyro.set_rng_seed(1)
            losses.append(step.eager_loss(X[:20], kl_weight=w).item())
        pyro.set_rng_seed(1)
        guide_trace, model_trace = trace_pair(vae.model, enc.guide, X[:20])
    return losses, guide_trace, model_trace


def test_the_weight_scales_the_kl_to_the_prior_and_never_the_likelihood():
    losses, guide_trace, model_trace = weighted_losses("meanfield", (0.0, 1.0, 2.0))
    scale = 400 / 20
    # With TraceMeanField_ELBO the weighted term is the analytic KL (the same draw of z in
    # every call, so the likelihood term cancels exactly).
    kl = kl_divergence(guide_trace.nodes["z"]["fn"], model_trace.nodes["z"]["fn"]).sum().item()
    assert losses[1] - losses[0] == pytest.approx(scale * kl, rel=1e-4)
    assert losses[2] - losses[1] == pytest.approx(scale * kl, rel=1e-4)
    # Weight 0 leaves the likelihood alone, at its full scale.
    model_trace.compute_log_prob()
    recon = model_trace.nodes["x"]["log_prob"].sum().item()
    assert losses[0] == pytest.approx(-scale * recon, rel=1e-5)


def test_trace_elbo_weights_the_latent_log_ratio_linearly():
    losses, *_ = weighted_losses("trace", (0.0, 0.5, 1.0))
    assert losses[1] == pytest.approx((losses[0] + losses[2]) / 2, rel=1e-5)


def run_steps(kl_weighted, jit, elbo="trace", weight=1.0, clip_norm=None):
    vae, enc = small_pair()
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    step = ElboStep(vae.model, enc.guide, 400, lr=0.01, elbo=elbo, jit=jit,
                    kl_weighted=kl_weighted, clip_norm=clip_norm)
    batches = [X[:16], X[16:32], X[:16], X[32:], X[16:32]]
    losses = [step(b, kl_weight=weight) if kl_weighted else step(b) for b in batches]
    params = {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}
    return step, losses, params


@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
def test_beta_one_is_the_plain_elbo_step_for_step(elbo):
    plain = run_steps(False, jit=True, elbo=elbo)
    weighted = run_steps(True, jit=True, elbo=elbo, weight=1.0)
    assert weighted[0].compiled.enabled, weighted[0].compiled.reason
    assert weighted[1] == plain[1]
    for name, value in plain[2].items():
        torch.testing.assert_close(weighted[2][name], value, rtol=0, atol=0)


def test_a_warm_up_is_replayed_from_a_recording_that_sees_the_weight():
    """The weight changes every step; the recording takes it as an input, so the recorded run
    is the eager run to rounding and the recording is never found stale."""
    data = load_digits()
    histories, steps = [], []
    for jit in (True, False):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        vae, enc = VAE(64, 4, (16,)), MeanFieldGuide(64, 4, (16,))
        options = FitOptions(epochs=3, eval_every=3, eval_samples=5, progress=False, jit=jit,
                             kl_warmup=2, batch_size=200)
        result = fit(vae.model, enc.guide, data, options)
        histories.append(result.history)
        steps.append(result.step)
    assert steps[0].compiled.enabled, steps[0].compiled.reason
    recorded, eager = histories
    assert [r["train_objective"] for r in recorded] == pytest.approx(
        [r["train_objective"] for r in eager], rel=1e-5)
    assert [r["kl_weight"] for r in recorded] == [0.0, 0.5, 1.0]
    # The ELBO is recorded only for the epoch that trained it.
    assert [r["train_elbo"] is None for r in recorded] == [True, True, False]
    assert recorded[2]["train_elbo"] == recorded[2]["train_objective"]
    # Evaluation is at weight 1: the test ELBO is a true bound whatever the weight.
    assert all(r["test_elbo"] < 0 for r in recorded)


def test_kl_schedule_rises_linearly_then_stays_at_beta():
    schedule = KLSchedule(beta=2.0, warmup_epochs=2)
    weights = [schedule.weight(e, s, 4) for e in (1, 2, 3) for s in (1, 2, 3, 4)]
    assert weights == pytest.approx([0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2, 2, 2])
    assert not schedule.is_elbo(3) and KLSchedule(1.0, 2).is_elbo(3)
    assert not KLSchedule(1.0, 2).is_elbo(2)


def test_tracegraph_is_the_elbo_with_a_lower_variance_score_function_gradient():
    """TraceGraph_ELBO estimates the same ELBO; for a sequence of discrete latents its score term
    for z_i carries only the costs downstream of z_i (Trace_ELBO's carries every cost outside
    z_i's plates: here all of them), so the last latents' gradients are far less noisy."""
    x = torch.linspace(-2, 2, 10)

    def model(x):
        for i in range(len(x)):
            z = pyro.sample(f"z_{i}", dist.Bernoulli(0.5))
            pyro.sample(f"x_{i}", dist.Normal(2.0 * z - 1.0, 1.0), obs=x[i])

    def guide(x):
        logit = pyro.param("logit", torch.zeros(len(x)))
        for i in range(len(x)):
            pyro.sample(f"z_{i}", dist.Bernoulli(logits=logit[i]))

    def gradients(elbo, repeats=200):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        grads, losses = [], []
        for _ in range(repeats):
            loss = elbo.differentiable_loss(model, guide, x)
            logit = pyro.param("logit").unconstrained()
            grads.append(torch.autograd.grad(loss, logit)[0])
            losses.append(loss.item())
        return torch.stack(grads), torch.tensor(losses)

    g_trace, l_trace = gradients(Trace_ELBO())
    g_graph, l_graph = gradients(TraceGraphELBO())
    # The same objective: mean losses agree within their Monte Carlo error.
    se = math.sqrt(l_trace.var() / len(l_trace) + l_graph.var() / len(l_graph))
    assert abs(l_trace.mean() - l_graph.mean()) < 4 * se
    # The same gradient in expectation, with a fraction of the variance.
    se_g = (g_trace.var(0) / len(g_trace) + g_graph.var(0) / len(g_graph)).sqrt()
    assert ((g_trace.mean(0) - g_graph.mean(0)).abs() < 4 * se_g + 1e-6).float().mean() > 0.9
    # z_9's score carries x_9's cost alone instead of all ten.
    assert g_graph.var(0)[-1] < g_trace.var(0)[-1] / 3
    assert g_graph.var(0).mean() < g_trace.var(0).mean()


def test_fit_trains_with_tracegraph():
    data = load_digits()
    vae, enc = VAE(64, 4, (16,)), MeanFieldGuide(64, 4, (16,))
    options = FitOptions(epochs=2, eval_every=2, eval_samples=5, progress=False,
                         elbo="tracegraph", batch_size=200)
    result = fit(vae.model, enc.guide, data, options)
    assert result.step.compiled.reason == "TraceGraph_ELBO runs eagerly"
    assert all(math.isfinite(r["train_elbo"]) for r in result.history)


@pytest.mark.parametrize("kind", ["cosine", "step"])
def test_epoch_schedules_are_torchs(kind):
    epochs = 12
    ours = LearningRateSchedule(kind, epochs, factor=0.5, step_epochs=3)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    torchs = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
              if kind == "cosine" else torch.optim.lr_scheduler.StepLR(optimizer, 3, gamma=0.5))
    expected = []
    for _ in range(epochs):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        torchs.step()
    assert [ours.multiplier(e) for e in range(1, epochs + 1)] == pytest.approx(expected)


def test_plateau_is_torchs_reduce_on_plateau():
    watched = [-100, -99, -98.5, -98.6, -98.7, -98.5, -98.4, -98.45, -98.5, -98.6, -98.7, -97,
               -97.1, -97.2, -97.3]
    ours = LearningRateSchedule("plateau", 20, factor=0.5, patience=2)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    torchs = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=0.5, patience=2, threshold=0.0, threshold_mode="abs")
    for epoch, value in enumerate(watched, start=1):
        assert ours.multiplier(epoch, watched[: epoch - 1]) == optimizer.param_groups[0]["lr"]
        torchs.step(value)
    assert optimizer.param_groups[0]["lr"] < 0.5  # the sequence did reach decays


def test_fit_applies_the_schedule_to_adam():
    data = load_digits()
    vae, enc = VAE(64, 4, (16,)), MeanFieldGuide(64, 4, (16,))
    options = FitOptions(epochs=3, eval_every=3, eval_samples=5, progress=False, lr=0.01,
                         lr_schedule="step", lr_step_epochs=1, lr_factor=0.5, batch_size=200)
    result = fit(vae.model, enc.guide, data, options)
    assert [r["lr"] for r in result.history] == pytest.approx([0.01, 0.005, 0.0025])
    assert all(g["lr"] == pytest.approx(0.0025) for g in result.step.optimizer.param_groups)


def test_clip_norm_bounds_the_gradient_adam_sees():
    step, *_ = run_steps(False, jit=True, clip_norm=0.5)
    grads = [p.grad for g in step.optimizer.param_groups for p in g["params"] if p.grad is not None]
    assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) \
        <= 0.5 * (1 + 1e-5)
    assert step.clipped == 5
    unclipped, *_ = run_steps(False, jit=True)
    grads = [p.grad for g in unclipped.optimizer.param_groups for p in g["params"]]
    assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) > 0.5


def early_stopped_run(tmp_path, epochs, resume=None, out="run"):
    data = load_digits().with_validation(0.2)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae, enc = VAE(64, 4, (16,)), MeanFieldGuide(64, 4, (16,))
    (tmp_path / out).mkdir(exist_ok=True)
    options = FitOptions(epochs=epochs, eval_every=1, eval_samples=5, eval_points=20,
                         progress=False, lr=0.03, patience=2, batch_size=100,
                         lr_schedule="plateau", lr_patience=0, lr_factor=0.5,
                         kl_warmup=3, clip_norm=20.0)
    return fit(vae.model, enc.guide, data, options, run_dir=tmp_path / out, resume=resume), vae, enc


def test_early_stopping_ends_at_the_best_validation_epoch(tmp_path):
    result, vae, enc = early_stopped_run(tmp_path, epochs=60)
    history = result.history
    values = [r["validation_elbo"] for r in history]
    best = max(range(len(values)), key=values.__getitem__)
    assert len(history) < 60, "the validation ELBO should stop rising at lr 0.03 within 60 epochs"
    assert history[-1]["early_stop"] == {"best_epoch": best + 1, "patience": 2}
    assert len(history) - 1 - best == 2
    # The pair, and the checkpoint, hold the best epoch's parameters.
    best_params = torch.load(tmp_path / "run" / "best.pt", weights_only=False)["params"]
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    for name, p in pyro.get_param_store().named_parameters():
        torch.testing.assert_close(p.detach(), best_params[name])
        torch.testing.assert_close(saved["params"][name], best_params[name])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["early_stop"]["best_epoch"] == best + 1


def test_every_control_resumes_exactly(tmp_path):
    """Early stopping, the plateau schedule and the KL warm-up are functions of the history
    and the epoch, the best parameters are on disk, the counters in the records: a run stopped
    after 4 epochs and resumed writes what the uninterrupted run wrote."""
    whole, *_ = early_stopped_run(tmp_path, epochs=60, out="whole")
    stopped_at = len(whole.history)
    assert stopped_at > 4
    assert len({r["lr"] for r in whole.history}) > 1, "the plateau schedule should have decayed"
    assert 0 < whole.history[3]["clipped_steps"] < whole.history[-1]["clipped_steps"]
    early_stopped_run(tmp_path, epochs=4, out="split")
    state = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    history = [json.loads(line) for line in
               (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    # Reload into a fresh pair, as --resume does.
    pyro.clear_param_store()
    vae, enc = VAE(64, 4, (16,)), MeanFieldGuide(64, 4, (16,))
    resume = load_checkpoint(tmp_path / "split" / "checkpoint.pt", vae.model, enc.guide,
                             torch.zeros(1, 64))
    resume["history"] = history
    assert resume["epoch"] == state["epoch"] == 4
    data = load_digits().with_validation(0.2)
    pyro.set_rng_seed(0)  # unused: the checkpoint's streams are restored
    options = FitOptions(epochs=60, eval_every=1, eval_samples=5, eval_points=20,
                         progress=False, lr=0.03, patience=2, batch_size=100,
                         lr_schedule="plateau", lr_patience=0, lr_factor=0.5,
                         kl_warmup=3, clip_norm=20.0)
    resumed = fit(vae.model, enc.guide, data, options, run_dir=tmp_path / "split", resume=resume)
    def numbers(history):
        return [v for r in history for v in (
            r["epoch"], r["train_objective"], r["lr"], r["kl_weight"], r["clipped_steps"],
            r["validation_elbo"], r["diagnostics"]["elbo"]["mean"])]

    assert len(resumed.history) == stopped_at
    assert numbers(resumed.history) == pytest.approx(numbers(whole.history), rel=1e-6)
    assert resumed.history[-1]["early_stop"] == whole.history[-1]["early_stop"]


def test_training_controls_refuse_what_they_cannot_do():
    data = load_digits()
    vae, enc = VAE(64, 4, (16,)), MeanFieldGuide(64, 4, (16,))
    with pytest.raises(ConfigError, match="^patience stops on the ELBO of a validation split.*"
                                          "with_validation"):
        fit(vae.model, enc.guide, data, FitOptions(epochs=1, patience=3, progress=False))
    # A Python caller reads its own names, not the command line's flags.
    for bad, match in (({"beta": 0.0}, "^beta "), ({"kl_warmup": -1}, "^kl_warmup "),
                       ({"lr_schedule": "linear"}, "^lr_schedule "), ({"clip_norm": -1.0},
                                                                         "^clip_norm "),
                       ({"lr_factor": 1.5}, "^lr_factor "),
                       ({"elbo": "iwae", "beta": 2.0}, "^elbo iwae")):
        with pytest.raises(ConfigError, match=match):
            FitOptions(**bad).check(100)


def test_a_run_with_controls_reloads(tmp_path):
    """load_run rebuilds a run trained with the controls (its config holds them)."""
    from elbogap.runs.run_directory import new_run, train

    run, options = new_run({"epochs": 2, "kl_warmup": 1, "beta": 0.5, "clip_norm": 5.0,
                            "lr_schedule": "cosine", "eval_every": 2, "eval_samples": 5,
                            "num_samples": 10, "progress": False}, tmp_path / "r")
    options.progress = False
    train(run, options)
    again = load_run(tmp_path / "r")
    assert again.options.kl_warmup == 1 and again.options.lr_schedule == "cosine"
    assert again.history[-1]["kl_weight"] == 0.5
