"""What a newcomer meets in a first hour: no quantity changed without a word, AIS that says
whether it converged and starts from autoguides, plots that carry the table's caveats, data
checked before anything runs, and the small breaks of a first fit."""

from __future__ import annotations

import json

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from elbogap import DataError, Dataset, FitOptions, OptionError, annealed_evidence, evaluate, fit
from elbogap.models.linear_gaussian import LinearGaussian
from tests.cli.test_scripts import run

# --- 1. a data set's unit is never subset ---------------------------------------------------

REGRESSION = '''
import pyro
import pyro.distributions as dist
import torch


def make():
    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("points", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)
    return model
'''


@pytest.fixture(scope="module")
def global_latent_run(tmp_path_factory):
    """A regression with global weights (AutoNormal) on 150 rows: 135 for training."""
    tmp = tmp_path_factory.mktemp("global")
    (tmp / "regression.py").write_text(REGRESSION)
    g = np.random.RandomState(0)
    x = g.randn(150, 3).astype(np.float32)
    y = (x @ np.array([1.0, -0.5, 0.3]) + 0.5 * g.randn(150)).astype(np.float32)
    np.savez(tmp / "xy.npz", x=x, y=y)
    out = tmp / "run"
    result = run("fit.py", "--data", "array", "--data-dir", str(tmp / "xy.npz"), "--model",
                 f"{tmp / 'regression.py'}:make", "--guide", "auto-normal", "--epochs", "15",
                 "--batch-size", "27", "--lr", "0.05", "--num-samples", "100",
                 "--eval-samples", "10", "--no-progress", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_ais_on_a_data_set_unit_takes_the_whole_data_set_and_names_its_n(global_latent_run):
    result = run("evaluate.py", str(global_latent_run), "--method", "ais", "--chains", "4",
                 "--ais-steps", "20", "-K", "100", "--no-progress", "--trust-code")
    assert result.returncode == 0, result.stderr
    saved = json.loads((global_latent_run / "ais-train-C4-T20.json").read_text())
    assert saved["ais"]["num_data"] == 135 and saved["importance"]["num_data"] == 135
    assert "whole data set, N=135" in result.stdout
    # Chains start from the AutoNormal guide itself: its density is read through its
    # auxiliary sites.
    assert saved["ais"]["start"] == "guide"


@pytest.mark.parametrize("flags", [["--method", "ais", "--points", "10"], ["--max-points", "10"]])
def test_a_subset_of_a_data_set_unit_is_refused_with_the_reason(global_latent_run, flags):
    result = run("evaluate.py", str(global_latent_run), *flags, "--chains", "2", "--ais-steps",
                 "2", "--no-progress", "--trust-code") if "ais" in flags else run(
        "evaluate.py", str(global_latent_run), *flags, "--no-progress", "--trust-code")
    assert result.returncode != 0
    assert "global latents" in result.stderr and "N=135" in result.stderr
    assert "Traceback" not in result.stderr


# --- 2. AIS says whether it converged; it starts from autoguides ----------------------------

def _linear_gaussian(n=6, data_dim=8, latent_dim=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    model = LinearGaussian.from_parameters(
        torch.randn(data_dim, latent_dim, generator=g), torch.randn(data_dim, generator=g),
        0.05 + 0.1 * torch.rand(data_dim, generator=g))
    return model, model.sample(n, g)


def test_ais_with_too_few_steps_says_it_has_not_converged():
    """From the prior, 8 steps (2 at a quarter) cannot reach a posterior this narrow: the full
    schedule is far above its quarter, and the note says the estimate is still rising."""
    lg, x = _linear_gaussian()
    a = annealed_evidence(lg.model, _posterior_guide(lg), x, num_chains=8, num_steps=8,
                          start="prior", seed=0)
    c = a.convergence
    assert c["verdict"] == "not converged" and c["num_steps"] == 2
    assert c["difference"]["mean"] > 2 * c["difference"]["se"]
    assert any("AIS has not converged" in n for n in a.notes)
    # And it was right: the estimate is below the exact log p(x) by far more than its SE.
    exact = lg.log_evidence(x).double().mean()
    assert a.log_evidence.double().mean() < exact - 1.0
    assert a.summary()["convergence"]["verdict"] == "not converged"


def _posterior_guide(lg):
    def guide(x):
        mean, cov = lg.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(mean.detach(), cov.detach()))
    return guide


def test_ais_from_the_exact_posterior_agrees_with_itself():
    lg, x = _linear_gaussian()
    a = annealed_evidence(lg.model, _posterior_guide(lg), x, num_chains=4, num_steps=8, seed=0)
    assert a.convergence["verdict"] == "converged" and not a.notes


def _conjugate_regression(n=40, d=3, sigma=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, generator=g) + sigma * torch.randn(n, generator=g)

    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(d), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w, sigma), obs=y)

    # y ~ N(0, X X^T + sigma^2 I): log p(y) exactly.
    exact = dist.MultivariateNormal(torch.zeros(n, dtype=torch.float64),
                                    (x @ x.T).double() + sigma ** 2 * torch.eye(n).double())
    return model, x, y, float(exact.log_prob(y.double()))


@pytest.mark.parametrize("autoguide", [AutoNormal, AutoMultivariateNormal])
def test_ais_starts_from_an_autoguide_and_lands_on_the_exact_evidence(autoguide):
    """AutoNormal (one auxiliary site per latent) and AutoMultivariateNormal (one packed
    vector): AIS from the guide's own density agrees with the closed form, and its starting
    draws' ELBO with Trace_ELBO's."""
    model, x, y, exact = _conjugate_regression()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = autoguide(model)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    for _ in range(200):
        svi.step(x, y)
    a = annealed_evidence(model, guide, x, y, num_chains=8, num_steps=100, seed=0)
    assert a.start == "guide" and a.unit == "data set" and a.num_points == 40
    se = float(a.log_evidence_se[0])
    assert abs(float(a.log_evidence[0]) - exact) < 4 * se + 0.05, (a.log_evidence, exact, se)
    elbo = -np.mean([pyro.infer.Trace_ELBO().loss(model, guide, x, y) for _ in range(400)])
    assert abs(float(a.elbo[0]) - elbo) < 4 * float(a.elbo_se[0]) + 0.05


# --- 3. the plots carry what the table says -------------------------------------------------

def _record(epoch, unit="data point", share=0.0, se=0.1, conditional=False):
    khat = {"share_unreliable": share, "share_unstable": 0.0, "verdict":
            "k-hat of the joint weights 1.62 > 0.7: log p(x_1..N) and the evidence gap are "
            "NOT reliable" if share else "all points have k-hat < 0.5"}
    entry = {"mean": -10.0 + epoch, "se": se if unit == "data point" else None}
    diag = {"unit": unit, "num_data": 50, "num_samples": 100, "observed": ["y"],
            "conditional": conditional, "khat": khat, "log_evidence": entry, "elbo": entry,
            "evidence_gap": {"mean": 0.5, "se": se}, "reconstruction": entry,
            "kl_prior": entry, "evidence_gap_mc_se": 0.01}
    return {"epoch": epoch, "diagnostics": diag}


def test_an_unreliable_evidence_is_drawn_dashed_without_a_band_and_says_why():
    from elbogap.presentation.figures import plot_evidence_gap

    fig = plot_evidence_gap([_record(e, share=1.0) for e in (1, 2, 3)])
    top, bottom = fig.axes
    for ax in (top, bottom):
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any("NOT reliable" in t for t in legend), legend
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert dashed and np.isfinite(dashed[0].get_ydata()).all()
    # The gap has no band where it cannot be believed, and the verdict is written on it.
    band = bottom.collections[0].get_paths()
    assert not band or all(len(p.vertices) == 0 or not np.isfinite(p.vertices).all()
                           for p in band)
    assert any("NOT reliable" in t.get_text() for t in bottom.texts)


def test_a_data_set_units_plots_are_labelled_from_the_pair_and_legends_match():
    from elbogap.presentation.figures import plot_evidence_gap, plot_terms_curves

    records = [_record(e, unit="data set", conditional=True) for e in (1, 2)]
    fig = plot_terms_curves(records)
    titles = " ".join(ax.get_title() for ax in fig.axes)
    assert "q(z|x)" not in titles and "log p(x|z)" not in titles
    assert "log p(y_1..N | z, inputs)" in titles
    for ax in fig.axes:
        # No SE over points for a data set's totals: no band drawn, none in the legend.
        assert not any("SE" in t.get_text() for t in ax.get_legend().get_texts())
        assert not ax.collections
    gap = plot_evidence_gap(records)
    assert "log p(y_1..N | inputs)" in gap.axes[1].get_title()
    assert "q(z|x)" not in gap.axes[1].get_title()


# --- 4. data checked against the model before anything runs --------------------------------

def logistic(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Bernoulli(logits=x @ w), obs=y)


def _logistic_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(100, 3, generator=g), (torch.rand(100, generator=g) < 0.5).float()


@pytest.mark.parametrize("call", ["fit", "evaluate"])
def test_nan_in_the_data_is_named_with_its_argument_and_row(call):
    x, y = _logistic_data()
    x[7, 1] = float("nan")
    pyro.clear_param_store()
    with pytest.raises(DataError, match=r"argument 'x': NaN at row 7, column 1"):
        if call == "fit":
            fit(logistic, AutoNormal(logistic), (x, y), FitOptions(epochs=1, progress=False))
        else:
            evaluate(logistic, AutoNormal(logistic), x, y, num_samples=10)


@pytest.mark.parametrize("call", ["fit", "evaluate"])
def test_a_value_outside_the_support_is_refused_on_all_rows_not_the_first_batch(call):
    """Row 42 is in the fifth minibatch of 10: Pyro's validation on the first never sees it."""
    x, y = _logistic_data()
    y[42] = 0.5
    pyro.clear_param_store()
    with pytest.raises(DataError, match=r"site 'obs' \(argument 'y'\): value 0.5 at row 42 is "
                                        r"outside the support of Bernoulli \(0 or 1\)"):
        if call == "fit":
            fit(logistic, AutoNormal(logistic), (x, y),
                FitOptions(epochs=1, batch_size=10, progress=False))
        else:
            evaluate(logistic, AutoNormal(logistic), x, y, num_samples=10)


def test_mismatched_row_counts_name_both_arrays():
    x, y = _logistic_data()
    pyro.clear_param_store()
    with pytest.raises(DataError, match=r"argument 'y', observed at site 'obs', has 90 rows .*"
                                        r"argument 'x' has 100"):
        fit(logistic, AutoNormal(logistic), (x, y[:90]), FitOptions(epochs=1, progress=False))


def test_an_npz_whose_arrays_disagree_in_rows_is_refused_naming_them(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((100, 3), np.float32),
             y=np.zeros(90, np.float32))
    (tmp_path / "regression.py").write_text(REGRESSION)
    result = run("fit.py", "--data", "array", "--data-dir", str(tmp_path / "bad.npz"), "--model",
                 f"{tmp_path / 'regression.py'}:make", "--guide", "auto-normal", "--epochs", "1",
                 "--no-progress", "--out", str(tmp_path / "run"))
    assert result.returncode != 0
    assert "bad.npz" in result.stderr and "x has 100, y has 90" in result.stderr
    assert "--batch-size" not in result.stderr


def test_a_failed_first_step_gives_pyros_reason_not_only_its_header():
    from elbogap.foundations.traces import first_line

    e = ValueError("Error while computing log_prob at site 'obs':\nThe value argument must be "
                   "within the support\n  Trace Shapes: ...")
    assert first_line(e) == ("Error while computing log_prob at site 'obs': The value argument "
                             "must be within the support")


# --- 5. small breaks ------------------------------------------------------------------------

def test_fit_creates_its_run_directory(tmp_path):
    x, y = _logistic_data()
    pyro.clear_param_store()
    out = tmp_path / "new" / "dir"
    fit(logistic, AutoNormal(logistic), (x, y), FitOptions(epochs=2, batch_size=50,
                                                           progress=False), run_dir=out)
    assert (out / "metrics.jsonl").is_file() and (out / "checkpoint.pt").is_file()


def test_fit_options_refuse_a_bad_value_where_they_are_written():
    with pytest.raises(OptionError, match="epochs must be a positive integer, got 0"):
        FitOptions(epochs=0)
    with pytest.raises(OptionError, match="lr"):
        FitOptions(lr=-1.0)


def test_a_dataset_of_ones_own_tensors_needs_no_image_shape_or_likelihood():
    x, y = _logistic_data()
    data = Dataset.from_tensors((x[:80], y[:80]), test=(x[80:], y[80:]))
    assert data.likelihood == "the model's" and data.image_shape is None
    pyro.clear_param_store()
    result = fit(logistic, AutoNormal(logistic), data,
                 FitOptions(epochs=2, batch_size=20, progress=False, eval_samples=5))
    assert len(result.history) == 2
    with pytest.raises(DataError, match="train"):
        Dataset.from_tensors("not a tensor")


def test_a_model_file_imports_its_own_siblings(tmp_path):
    (tmp_path / "helpers.py").write_text("SCALE = 0.5\n")
    (tmp_path / "pair.py").write_text(REGRESSION.replace(
        "import torch\n", "import torch\nfrom helpers import SCALE\n").replace("0.5)", "SCALE)"))
    x = np.random.RandomState(0).randn(40, 3).astype(np.float32)
    np.savez(tmp_path / "xy.npz", x=x, y=x.sum(1))
    result = run("fit.py", "--data", "array", "--data-dir", str(tmp_path / "xy.npz"), "--model",
                 f"{tmp_path / 'pair.py'}:make", "--guide", "auto-normal", "--epochs", "1",
                 "--batch-size", "12", "--num-samples", "10", "--eval-samples", "5",
                 "--no-progress", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    import sys

    assert str(tmp_path) not in sys.path  # only while the file runs


def test_the_config_of_data_never_binarized_says_so(tmp_path):
    result = run("fit.py", "--epochs", "1", "--latent-dim", "2", "--hidden-dims", "8",
                 "--num-samples", "5", "--eval-samples", "5", "--test-points", "5",
                 "--no-progress", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["binarize"] is None


def test_one_point_is_one_point():
    from elbogap.presentation.table import format_annealed

    entry = {"mean": -1.0, "se": None}
    text = format_annealed({"ais": {"num_data": 1, "num_chains": 2, "num_steps": 3,
                                    "start": "prior", "acceptance": entry, "step_size": entry,
                                    "log_evidence": entry, "log_evidence_mc_se": 0.1}})
    assert "on 1 point:" in text and "1 points" not in text


# --- 6. time: diagnostics sized by the training's time --------------------------------------

def test_by_default_the_diagnostics_keep_to_a_share_of_training_and_never_change_it():
    """A pair whose evaluation costs far more than a training epoch: by default few epochs get
    the full diagnostics (the first and the last always), and the parameters come out exactly
    as with diagnostics every epoch (they draw from a stream of their own)."""
    x, y = _logistic_data()
    params = {}
    for every in (None, 1):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoNormal(logistic)
        result = fit(logistic, guide, (x, y), FitOptions(epochs=12, batch_size=100, lr=0.05,
                                                        eval_every=every, eval_samples=2000,
                                                        progress=False))
        diagnosed = [r["epoch"] for r in result.history if "diagnostics" in r]
        params[every] = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
        if every is None:
            assert diagnosed[0] == 1 and diagnosed[-1] == 12 and len(diagnosed) < 12
        else:
            assert diagnosed == list(range(1, 13))
    for name, value in params[1].items():
        assert torch.equal(value, params[None][name]), name


@pytest.mark.slow
def test_the_final_evaluation_estimate_is_within_twice_what_it_takes():
    """A regression with global latents that vmap cannot take (``.item()``), evaluated particle
    by particle in passes of 100 points, as a run's final evaluation is: the announced time
    against the time it then takes (a ratio in one process: the machine's load cancels)."""
    import time
    from types import SimpleNamespace

    from elbogap.foundations.program_data import ProgramData
    from elbogap.runs.diagnose import final_evaluation_seconds

    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        scale = 1.0 + 0.0 * w.sum().item()
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w, scale), obs=y)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1500, 3, generator=g)
    y = x.sum(1)
    pyro.clear_param_store()
    guide = AutoNormal(model)
    run_ = SimpleNamespace(model=model, guide=guide, config={"num_samples": 1000},
                           options=SimpleNamespace(data_plate=None))
    said = final_evaluation_seconds(run_, ProgramData.of(x, y), batch_size=100)
    start = time.perf_counter()
    evaluate(model, guide, x, y, num_samples=1000, batch_size=100)
    took = time.perf_counter() - start
    assert took / 2 <= said <= 2 * took, (said, took)


def test_the_report_leaves_out_what_its_time_budget_cannot_hold_and_says_so(tmp_path):
    from elbogap import Report, new_run, train

    run_, options = new_run({"epochs": 1, "latent_dim": 2, "hidden_dims": [8], "num_samples": 20,
                             "eval_samples": 5, "progress": False}, tmp_path / "r")
    train(run_, options)
    report = Report.build(run_, num_samples=20, max_points=20, time_budget=1e-6,
                          progress=False)
    said = " ".join(n.text for n in report.notes)
    for section in ("calibration of the guide", "annealed importance sampling and BDMC",
                    "the gap's split", "guide draws"):
        assert f"Left out: {section}" in said, section
    assert "ais" not in report.numbers and report.idata is None
    with pytest.raises(OptionError, match="time_budget"):
        Report.build(run_, time_budget=-1.0, progress=False)
