"""The Python API does what the scripts do: a run picked up with load_run, Diagnostics shown as
a table, its plots, the report, registries, devices, validation splits, conditional models."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pyro
import pytest
import torch
from matplotlib.figure import Figure

import elbogap
from elbogap import (
    ConfigError,
    FitOptions,
    Report,
    build_pair,
    evaluate,
    fit,
    load_dataset,
    load_run,
    move_pair,
    resolve_device,
)
from elbogap.data.dataset import Dataset
from elbogap.foundations.device import modules_of, rows_per_chunk
from elbogap.runs.pairs import registered_guides, registered_models
from elbogap.training.fitting import FitResult
from tests.cli.test_scripts import run
from tests.real_programs import cvae

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[2]
FAST = ["--epochs", "2", "--num-samples", "50", "--eval-samples", "10", "--eval-points", "50",
        "--no-progress"]


def script(name, *args):
    """``scripts/NAME.py`` run in this process (``tests.cli.test_scripts.run``)."""
    return run(f"{name}.py", *args)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    result = script("fit", *FAST, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_load_run_restores_the_fitted_pair_the_scripts_evaluate(run_dir):
    """evaluate() on load_run's pair, same seed and K as scripts/evaluate.py: the same numbers."""
    result = script("evaluate", str(run_dir), "-K", "40", "--max-points", "30", "--no-progress")
    assert result.returncode == 0, result.stderr
    by_script = json.loads((run_dir / "evaluation-test-K40.json").read_text())
    run = load_run(run_dir)
    assert run.split == "test" and run.state["epoch"] == 2 and len(run.history) == 2
    pyro.set_rng_seed(0)
    d = evaluate(run.model, run.guide, elbogap.subset(run.data.test, 30), num_samples=40,
                 batch_size=100, data_plate=run.options.data_plate)
    for key in ("elbo", "log_evidence", "evidence_gap"):
        assert d.summary()[key]["mean"] == pytest.approx(by_script[key]["mean"], abs=1e-5)


def test_diagnostics_read_as_a_table_and_plot_themselves(run_dir):
    run = load_run(run_dir)
    d = evaluate(run.model, run.guide, run.data.test[:40], num_samples=30)
    text = repr(d)
    assert text.splitlines()[0].startswith("nats per data point, N=40")
    assert "log p(x)  importance sampling, K=30" in text and "tensor(" not in text
    html = d._repr_html_()
    assert html.startswith("<table>") and "evidence gap" in html and "KL(q(z|x) || p(z))" in html
    kl, khat = d.plot_kl_per_dim(), d.plot_khat()
    assert isinstance(kl, Figure) and isinstance(khat, Figure)
    # One bar per latent dimension (10 on the digits default).
    assert len(kl.axes[0].patches) == run.config["latent_dim"]


def test_the_objects_a_notebook_shows_are_one_line_each(run_dir):
    run = load_run(run_dir)
    assert repr(run) == (f"Run('{run_dir}': data digits, model vae, guide mean-field, epoch 2 "
                         "of 2, diagnosed on test)")
    assert repr(run.data) == ("Dataset('digits': train (1500, 64), test (297, 64); likelihood "
                              f"{run.data.likelihood})")
    result = FitResult(history=run.history)
    last = run.history[-1]
    assert repr(result) == (f"FitResult(2 epochs; last epoch 2: train_objective "
                            f"{last['train_objective']:.3f}, test_elbo {last['test_elbo']:.3f})")


def test_report_builds_from_python_and_writes_what_the_script_writes(run_dir, tmp_path):
    run = load_run(run_dir)
    report = Report.build(run, num_samples=30, max_points=40, amortization_points=4,
                          amortization_steps=5, idata_points=2, idata_draws=20, ais_points=3,
                          ais_steps=10, ais_chains=4, progress=False)
    page = report._repr_html_()
    assert "Gap decomposition" in page and "Reliability of the evidence estimate" in page
    # A notebook cell that ends in the object shows a line, not its contents (HTML aside).
    assert repr(report).startswith(f"<Report of run {run_dir}") and len(repr(report)) < 300
    assert "AIS beside importance sampling" in page and "BDMC bracket" in page
    assert "ELBO surgery" in page and "approximation gap with AIS" in page
    written = report.write(tmp_path)
    assert [p.name for p in written] == ["report.html", "report.json", "inference_data.nc"]
    numbers = json.loads((tmp_path / "report.json").read_text())
    assert numbers["num_data"] == 40 and "gap_decomposition" in numbers
    assert {"ais", "bdmc", "elbo_surgery"} <= set(numbers)
    with pytest.raises(ConfigError, match="^num_samples must be a positive integer, got 0$"):
        Report.build(run, num_samples=0)


def test_registries_come_from_entry_points_and_users_can_name_a_module(tmp_path, monkeypatch):
    assert {"vae", "linear-gaussian"} <= set(registered_models())
    assert {"mean-field", "linear", "optimal-mean-field"} <= set(registered_guides())
    (tmp_path / "my_pairs.py").write_text(
        "from tests.real_programs import ppca\n\n"
        "def make(data_dim):\n"
        "    assert data_dim == 5\n"
        "    return ppca.model\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = {"model": "my_pairs:make", "guide": "auto-normal", "latent_dim": 2,
              "hidden_dims": [], "likelihood": "gaussian"}
    pair = build_pair(config, data_dim=5)
    assert pair.guide.__class__.__name__ == "AutoNormal"
    with pytest.raises(ConfigError, match="my_pairs:missing: cannot import it"):
        build_pair({**config, "model": "my_pairs:missing"}, data_dim=5)


def test_a_conditional_model_is_labelled_log_p_of_y_given_inputs():
    net = cvae.CVAE()
    d = evaluate(net.model, net.guide, *cvae.data(12), num_samples=30)
    assert d.conditional and d.observed == ("y",)
    text = repr(d)
    assert "log p(y | inputs)  importance sampling" in text
    assert "KL(q(z | data) || p(z | inputs))" in text
    assert not any(line.startswith("log p(x)") for line in text.splitlines())


def test_a_validation_split_is_watched_during_training(run_dir, tmp_path):
    out = tmp_path / "run"
    result = script("fit", *FAST, "--val-fraction", "0.2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["validation_elbo"] is not None and "test_elbo" not in r for r in records)
    assert records[-1]["diagnostics"]["split"] == "validation"
    run = load_run(out)
    digits = load_dataset("digits")
    assert run.data.validation.shape[0] + run.data.train.shape[0] == digits.train.shape[0]
    assert torch.equal(run.data.test, digits.test)
    # The same rows in every run: the split depends on the data seed only.
    assert torch.equal(digits.with_validation(0.2).validation, run.data.validation)
    result = script("evaluate", str(out), "--split", "validation", "-K", "20", "--no-progress")
    assert result.returncode == 0 and "N=" + str(run.data.validation.shape[0]) in result.stdout
    result = script("evaluate", str(run_dir), "--split", "validation", "--no-progress")
    assert result.returncode == 2 and "has no validation split" in result.stderr
    result = script("fit", *FAST, "--val-fraction", "1.5", "--out", str(tmp_path / "bad"))
    assert result.returncode == 2 and "--val-fraction must be between 0 and 1" in result.stderr


def test_devices_are_named_clearly():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ConfigError, match="expected auto, cpu, cuda or cuda:INDEX"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="torch sees no CUDA device"):
            resolve_device("cuda:0")
    assert rows_per_chunk(torch.device("cpu")) < rows_per_chunk(torch.device("cuda", 0))
    result = script("fit", *FAST, "--device", "tpu")
    assert result.returncode == 2 and "--device 'tpu'" in result.stderr


def test_move_pair_moves_modules_closures_and_the_param_store():
    """On the meta device, which every machine has: nothing of the pair is left on the CPU."""
    net = cvae.CVAE()
    xs, ys = cvae.data(6)
    guide_params = {}

    def guide(xs, ys=None):  # a closure holding the module, as users write them
        pyro.module("cvae", net)
        guide_params["scale"] = pyro.param("extra_scale", torch.ones(()))
        return net.guide(xs, ys)

    assert modules_of(guide) == [net] and modules_of(net.model) == [net]
    evaluate(net.model, guide, xs, ys, num_samples=2)
    move_pair(net.model, guide, torch.device("meta"))
    assert all(p.device.type == "meta" for p in net.parameters())
    store = dict(pyro.get_param_store().named_parameters())
    assert store and all(v.device.type == "meta" for v in store.values())
    # The store still holds the module's own tensors (moved in place, not copied).
    assert any(v is p for v in store.values() for p in net.parameters())


def test_fit_on_the_cpu_device_option_equals_the_default():
    x = load_dataset("synthetic")
    small = Dataset("s", x.train[:200], x.test[:50], None, "gaussian")
    losses = []
    for device in (None, "cpu"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        pair = build_pair({"model": "linear-gaussian", "guide": "linear", "latent_dim": 3,
                           "hidden_dims": [], "likelihood": "gaussian"}, small.data_dim)
        options = FitOptions(epochs=2, batch_size=50, eval_samples=5, eval_points=20,
                             progress=False, **({"device": device} if device else {}))
        losses.append([r["train_elbo"] for r in fit(pair.model, pair.guide, small, options).history])
    assert losses[0] == losses[1]


@pytest.mark.gpu
def test_fit_and_evaluate_on_a_gpu_agree_with_the_cpu(tmp_path):
    """The digits VAE trained on the GPU, then evaluated there and on the CPU with the same
    parameters: the evidence agrees within Monte Carlo error, and results come back on the CPU."""
    out = tmp_path / "run"
    result = script("fit", *FAST, "--device", "cuda", "--out", str(out))
    assert result.returncode == 0, result.stderr
    run = load_run(out)
    x = run.data.test[:100]
    on_gpu = evaluate(run.model, run.guide, x, num_samples=500, device="cuda")
    assert on_gpu.log_evidence.device.type == "cpu"
    on_cpu = evaluate(run.model, run.guide, x, num_samples=500, device="cpu")
    diff = (on_gpu.log_evidence - on_cpu.log_evidence).double()
    se = (on_gpu.log_evidence_se.double() ** 2 + on_cpu.log_evidence_se.double() ** 2).sqrt()
    assert (diff.abs() < 5 * se + 1e-4).all()


def test_evaluate_script_runs_ais_beside_importance_sampling_and_bdmc(run_dir):
    result = script("evaluate", str(run_dir), "--method", "ais", "--points", "6", "--chains", "4",
                    "--ais-steps", "20", "-K", "50", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "log p(x)  AIS" in result.stdout and "AIS - importance sampling" in result.stdout
    saved = json.loads((run_dir / "ais-test-C4-T20.json").read_text())
    assert saved["ais"]["num_data"] == 6 and len(saved["per_point"]["khat"]) == 6
    result = script("evaluate", str(run_dir), "--bdmc", "--points", "6", "--chains", "4",
                    "--ais-steps", "20", "--no-progress")
    assert result.returncode == 0, result.stderr
    bounds = json.loads((run_dir / "bdmc-C4-T20.json").read_text())
    assert bounds["num_data"] == 6 and bounds["upper"] > bounds["lower"] - 1.0
    result = script("evaluate", str(run_dir), "--method", "ais", "--chains", "0")
    assert result.returncode == 2 and "--chains must be a positive integer" in result.stderr


def test_richer_guides_by_name_and_flows_only_for_iaf(tmp_path):
    for guide, extra in (("full-rank", []), ("iaf", ["--flows", "1"])):
        out = tmp_path / guide
        result = script("fit", *FAST, "--guide", guide, *extra, "--out", str(out))
        assert result.returncode == 0, result.stderr
        assert "site 'z' (monte-carlo)" in result.stdout
    assert json.loads((tmp_path / "iaf" / "config.json").read_text())["flows"] == 1
    result = script("fit", *FAST, "--flows", "2", "--out", str(tmp_path / "bad"))
    assert result.returncode == 2 and "--flows is for the iaf guide" in result.stderr


def test_compare_puts_runs_side_by_side_with_paired_differences(run_dir, tmp_path):
    other = tmp_path / "other"
    result = script("fit", *FAST, "--guide", "iaf", "--out", str(other))
    assert result.returncode == 0, result.stderr
    result = script("compare", str(run_dir), str(other), "-K", "40", "--points", "30",
                    "--amortization-points", "8", "--amortization-steps", "30",
                    "--out", str(tmp_path / "cmp"))
    assert result.returncode == 0, result.stderr
    assert "gap − first run's, paired" in result.stdout
    # Both runs' gaps split in two (they add up to the gap on those points): the mean-field
    # run against per-point Normals, the flow guide against itself fine-tuned on each point.
    assert "amortization gap" in result.stdout
    assert "a mean-field Normal fitted to each point" in result.stdout
    assert "other: q* of the gap's split is the guide with all its parameters fine-tuned" \
        in result.stdout
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["paired"][0] is None and saved["paired"][1]["evidence_gap"]["se"] > 0
    # The paired difference is the difference of the two runs' means on the same points.
    a, b = saved["summaries"]
    assert saved["paired"][1]["elbo"]["mean"] == pytest.approx(
        b["elbo"]["mean"] - a["elbo"]["mean"], abs=1e-6)
    g = a["gap_decomposition"]
    assert g["num_data"] == 8 and b["gap_decomposition"]["num_data"] == 8
    assert g["approximation_gap"]["mean"] + g["amortization_gap"]["mean"] == pytest.approx(
        g["log_evidence"]["mean"] - g["elbo_amortized"]["mean"], abs=1e-6)
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "Training curves overlaid" in page and "data:image/png;base64," in page
    result = script("compare", str(run_dir))
    assert result.returncode == 2 and "at least two run directories" in result.stderr


def test_compare_tells_the_same_program_arguments_from_others():
    """Runs on an .npz of named arrays hold ProgramData: compare pairs them only on equal ones."""
    from elbogap import ProgramData
    from elbogap.runs.compare import _same_data

    a = ProgramData.of(x=torch.ones(3, 2), y=torch.zeros(3))
    assert _same_data(a, ProgramData.of(x=torch.ones(3, 2), y=torch.zeros(3)))
    assert not _same_data(a, ProgramData.of(x=torch.ones(3, 2), y=torch.ones(3)))
    assert not _same_data(a, ProgramData.of(x=torch.ones(3, 2)))
    assert not _same_data(a, torch.ones(3, 2))
    assert _same_data(torch.ones(3, 2), torch.ones(3, 2))
