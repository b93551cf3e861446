"""The command-line scripts end to end, as a user runs them."""

import contextlib
import importlib
import io
import json
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

from elbogap.runs import diagnose

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--epochs", "3", "--num-samples", "50", "--eval-samples", "10", "--eval-points", "50",
        "--no-progress"]

USER_PAIR = '''
import pyro
import pyro.distributions as dist
import torch
from torch import nn


def make_pair(data_dim, latent_dim):
    """A linear-Gaussian-style pair written by a user, not registered anywhere."""
    decoder = nn.Linear(latent_dim, data_dim)
    encoder = nn.Linear(data_dim, 2 * latent_dim)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, raw = encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))

    return model, guide


not_a_pair = 3


def raising(data_dim):
    raise ValueError("no model here\\nand a second line")
'''


def load_script(name):
    """A command as a module, to call it in this process (no interpreter start-up): the
    installed ``elbogap.cli`` modules, and the benchmark beside the package."""
    if name == "benchmark":
        return importlib.import_module("benchmarks.benchmark")
    return importlib.import_module(f"elbogap.cli.{name}")


def run(script, *args):
    """``scripts/SCRIPT`` run in this process (no interpreter start-up): its exit code and
    what it printed, as a finished subprocess would give them (argparse's exits included)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = load_script(script.removesuffix(".py")).command(list(args))
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    result = run("fit.py", *FAST, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out, result


def test_fit_writes_a_complete_run_directory(fitted_run):
    out, result = fitted_run
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "diagnostics.json", "elbo.png",
                 "reconstruction_kl.png", "evidence_gap.png", "kl_per_dim.png",
                 "reconstructions.png", "prior_samples.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "diagnostics.json").read_text())
    assert summary["num_samples"] == 50 and summary["num_data"] == 297
    assert summary["data"] == "digits"
    for key in ("elbo", "reconstruction", "kl_prior", "log_evidence", "evidence_gap"):
        assert set(summary[key]) == {"mean", "se"}
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert "evidence gap" in result.stdout and str(out) in result.stdout


def test_evaluate_reloads_the_checkpoint(fitted_run):
    out, _ = fitted_run
    result = run("evaluate.py", str(out), "-K", "20", "--no-progress")
    assert result.returncode == 0, result.stderr
    again = json.loads((out / "evaluation-test-K20.json").read_text())
    original = json.loads((out / "diagnostics.json").read_text())
    # The analytic KL depends only on the encoder: equal iff the parameters came back.
    assert again["kl_prior"]["mean"] == pytest.approx(original["kl_prior"]["mean"], rel=1e-6)
    assert again["num_samples"] == 20


def test_calibrate_writes_strict_json_and_both_plots_of_the_runs_guide(fitted_run):
    out, _ = fitted_run
    result = run("calibrate.py", str(out), "-M", "200", "-L", "39", "--bins", "10")
    assert result.returncode == 0, result.stderr
    stem = out / "calibration-test-M200-L39"
    summary = json.loads(stem.with_suffix(".json").read_text())  # strict JSON: no NaN
    assert summary["num_simulations"] == 200 and summary["data"] == "digits"
    assert len(summary["sites"]["z"]) == 10  # the default VAE's ten latent dimensions
    assert (out / f"{stem.name}-ecdf.png").is_file() and (out / f"{stem.name}-ranks.png").is_file()
    assert "miscalibrated" in result.stdout and "Holm p" in result.stdout
    refitted = run("calibrate.py", str(out), "--vsbc", "-M", "2", "--refit-steps", "2", "-L",
                   "9", "--no-progress")
    assert refitted.returncode == 0, refitted.stderr
    assert json.loads((out / "vsbc-test-M2.json").read_text())["num_steps"] == 2
    refused = run("calibrate.py", str(out), "-L", "40")
    assert refused.returncode != 0 and "bins" in refused.stderr and "\n" not in refused.stderr.strip()


def test_report_is_self_contained_and_exports_arviz_data(fitted_run):
    out, _ = fitted_run
    result = run("report.py", str(out), "-K", "100", "--max-points", "60",
                 "--amortization-points", "10", "--amortization-steps", "20",
                 "--idata-points", "3", "--idata-draws", "50", "--no-progress")
    assert result.returncode == 0, result.stderr
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') >= 9
    assert "src=\"http" not in page and "<script" not in page
    for heading in ("Reliability of the evidence estimate", "Active units", "Gap decomposition",
                    "Latent space", "Where the gap comes from", "Calibration of the guide"):
        assert heading in page
    report = json.loads((out / "report.json").read_text())
    assert report["num_data"] == 60 and report["gap_decomposition"]["num_data"] == 10
    assert 0 <= report["khat"]["share_unreliable"] <= 1
    assert report["calibration"]["num_simulations"] == 1000
    assert len(report["calibration"]["sites"]["z"]) == 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz
    idata = arviz.from_netcdf(str(out / "inference_data.nc"))
    assert idata.posterior["z"].shape == (1, 50, 3, 10)
    assert idata.sample_stats["log_importance_weight"].shape == (1, 50, 3)


def test_existing_run_directory_is_not_overwritten(fitted_run):
    out, _ = fitted_run
    before = (out / "checkpoint.pt").read_bytes()
    result = run("fit.py", *FAST, "--out", str(out))
    assert result.returncode == 2
    assert "already holds a run" in result.stderr and "Traceback" not in result.stderr
    assert (out / "checkpoint.pt").read_bytes() == before


def test_a_users_own_pair_from_a_file(tmp_path):
    (tmp_path / "my_pair.py").write_text(USER_PAIR)
    result = run("fit.py", *FAST, "--latent-dim", "3", "--model",
                 f"{tmp_path / 'my_pair.py'}:make_pair", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "diagnostics.json").read_text())
    assert len(summary["kl_per_dim"]["z"]) == 3
    result = run("evaluate.py", str(tmp_path / "run"), "-K", "5", "--no-progress",
                 "--trust-code")
    assert result.returncode == 0, result.stderr


REGRESSION = '''
import pyro
import pyro.distributions as dist
import torch


def make():
    def model(x, y, mask):
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("points", x.shape[0]):
            with pyro.poutine.mask(mask=mask):
                pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)
    return model
'''


def test_named_arrays_of_an_npz_are_the_programs_keyword_arguments(tmp_path):
    (tmp_path / "regression.py").write_text(REGRESSION)
    g = np.random.RandomState(0)
    x = g.randn(60, 3).astype(np.float32)
    y = x @ np.array([1.0, -0.5, 0.3]) + 0.5 * g.randn(60)
    np.savez(tmp_path / "xy.npz", x=x, y=y, mask=np.arange(60) % 7 != 0)
    out = tmp_path / "run"
    result = run("fit.py", "--data", "array", "--data-dir", str(tmp_path / "xy.npz"), "--model",
                 f"{tmp_path / 'regression.py'}:make", "--guide", "auto-normal", "--epochs", "20",
                 "--batch-size", "18", "--lr", "0.05", "--num-samples", "200",
                 "--eval-samples", "10", "--no-progress", "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "diagnostics.json").read_text())
    # Plate "points" found; y is what is observed, given x (and the mask).
    assert summary["unit"] == "data set" and summary["num_data"] == 54
    assert summary["observed"] == ["y"] and summary["conditional"]
    result = run("evaluate.py", str(out), "-K", "20", "--no-progress", "--trust-code")
    assert result.returncode == 0, result.stderr
    assert "log p(y_1..N | inputs)" in result.stdout


def test_linear_gaussian_prints_estimates_beside_closed_forms(tmp_path):
    out = tmp_path / "lg"
    result = run("fit.py", "--model", "linear-gaussian", "--data", "synthetic", "--epochs", "5",
                 "--lr", "0.02", "--num-samples", "2000", "--eval-samples", "50",
                 "--no-progress", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "closed form vs estimate" in result.stdout
    summary = json.loads((out / "diagnostics.json").read_text())
    exact = summary["exact"]
    gap_se = summary["evidence_gap_mc_se"]
    assert abs(summary["evidence_gap"]["mean"] - exact["evidence_gap"]) < 4 * gap_se + 1e-6
    assert summary["kl_prior"]["mean"] == pytest.approx(exact["kl_prior"], rel=1e-5)
    assert summary["data_generating_log_evidence"] < 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("exact" in r for r in records if "diagnostics" in r)
    assert (out / "evidence_gap.png").is_file() and not (out / "reconstructions.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [(["--model", "missing.py:f"], "missing.py does not exist"),
     (["--model", "{pair}:nothing"], "defines no 'nothing'"),
     (["--model", "{pair}:not_a_pair"], "is not callable"),
     (["--model", "transformer"], "--model 'transformer': unknown"),
     (["--epochs", "0"], "epochs must be a positive integer"),
     (["--lr", "-0.1"], "lr must be a positive number"),
     (["--latent-dim", "0"], "--latent-dim must be a positive integer"),
     (["--num-samples", "0"], "--num-samples must be a positive integer"),
     (["--batch-size", "5000"], "larger than the training set"),
     (["--data", "mnist"], "pass their directory"),
     (["--data", "mnist", "--data-dir", "/nonexistent"], "/nonexistent: no such directory"),
     (["--hidden-dims", "a,b"], "expected comma-separated integers"),
     (["--guide", "optimal-mean-field"], "known in closed form only for the linear-Gaussian"),
     (["--data", "array", "--data-dir", "nothing.npy"], "nothing.npy: no such file"),
     (["--data-dir", "somewhere"], "--data-dir is for data read from files"),
     (["--resume", "runs/mistyped"], "--resume runs/mistyped: no such run directory"),
     (["--model", "{pair}:raising"], "raising(...) raised ValueError: no model here"),
     (["--model", "{pair}:make_pair", "--hidden-dims", "30"],
      "--hidden-dims: make_pair in {pair} takes no hidden_dims (it takes data_dim, latent_dim)"),
     (["--model", "{pair}:make_pair"], "--latent-dim is needed: make_pair in {pair} takes "
                                       "latent_dim without a default"),
     (["--model", "{pair}:make_pair", "--latent-dim", "2", "--guide", "mean-field"],
      "--guide 'mean-field': a model of one's own takes its guide from its factory"),
     (["--binarize", "threshold"], "--binarize threshold is for data mnist"),
     (["--test-points", "5000"], "--test-points 5000: data set 'digits' has 297 test points"),
     (["--data", "array", "--data-dir", "."], "is a directory; --data array reads one file"),
     (["--data", "array", "--data-dir", "header.csv"], "looks like a header of column names"),
     (["--epochs", "x"], "error: argument --epochs: invalid int value: 'x' (see --help)")],
)
def test_bad_command_lines_get_one_clear_line(tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "pair.py").write_text(USER_PAIR)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "header.csv").write_text("a,b,c\n1,2,3\n4,5,6\n")
    args = [a.replace("{pair}", str(tmp_path / "pair.py")) for a in args]
    message = message.replace("{pair}", str(tmp_path / "pair.py"))
    fit_script = load_script("fit")
    out = [] if "--resume" in args else ["--out", str(tmp_path / "run")]
    try:
        code = fit_script.command([*FAST, *args, *out])
    except SystemExit as e:  # argparse's own errors exit
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_unwritable_out_is_refused_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run("fit.py", *FAST, "--out", str(blocker / "run"))
    assert result.returncode == 2 and "cannot write there" in result.stderr


def test_resume_refuses_flags_it_would_ignore_and_abbreviations(tmp_path, capsys):
    fit_script = load_script("fit")
    run_dir = str(tmp_path / "run")
    assert fit_script.command([*FAST, "--out", run_dir]) == 0
    capsys.readouterr()
    code = fit_script.command(["--resume", run_dir, "--lr", "0.5",
                                                 "--batch-size", "10", "--epochs", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "--batch-size, --lr would be ignored" in err
    # A restart repeats the command that started the run: the run's own settings are no news.
    assert fit_script.command([*FAST, "--resume", run_dir, "--out", run_dir]) == 0
    assert "resuming" in capsys.readouterr().out
    result = run("fit.py", "--epoch", "3", "--out", str(tmp_path / "other"))
    assert result.returncode == 2 and "unrecognized arguments: --epoch 3" in result.stderr


def test_a_run_that_never_completed_an_epoch_does_not_block_the_rerun(tmp_path, capsys):
    fit_script = load_script("fit")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")  # what a run failing in its first step leaves
    assert fit_script.command([*FAST, "--out", str(run_dir)]) == 0
    assert "never completed an epoch" in capsys.readouterr().out
    assert (run_dir / "checkpoint.pt").is_file()
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert fit_script.command([*FAST, "--out", str(blocker)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["fit", "evaluate", "report", "kl_directions", "calibrate",
                                    "benchmark"])
def test_help_states_every_flag_and_each_default_once(script):
    parser = load_script(script).parser()
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert not undocumented
    text = parser.format_help()
    assert "(default: True)" not in text and "(default: False)" not in text
    assert not [line for line in text.splitlines() if line.count("default") > 1]


def test_final_evaluation_says_what_it_costs_and_test_points_bound_it(tmp_path, capsys,
                                                                     monkeypatch):
    fit_script = load_script("fit")
    monkeypatch.setattr(diagnose, "ANNOUNCE_AFTER_SECONDS", 0)  # every estimate is "long"
    args = [*FAST, "--test-points", "40", "--out", str(tmp_path / "run")]
    assert fit_script.command(args) == 0
    out = capsys.readouterr().out
    assert "final evaluation: 40 test points x K=50, about" in out
    summary = json.loads((tmp_path / "run" / "diagnostics.json").read_text())
    assert summary["num_data"] == 40
