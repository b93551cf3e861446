"""Every file of a run directory is read defensively: a damaged one is one line naming the file and
what was expected (an ElbogapError in Python, exit 2 in the scripts), and a run's model file is
code that is run only when it is still the file the run was fitted with."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elbogap import ConfigError, final_summary, load_run
from elbogap.runs.run_directory import new_run, resumed_run, train
from tests.limits import HANG_SECONDS
from tests.pairs import LINEAR_PAIR_FILE

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"data": "synthetic", "model": "linear-gaussian", "guide": "mean-field",
            "batch_size": 100, "epochs": 2, "eval_every": 1, "eval_samples": 5,
            "num_samples": 10, "progress": False}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("damaged") / "run"
    run, options = new_run(SETTINGS, out)
    train(run, options)
    final_summary(run, progress=False)
    return out


@pytest.fixture
def copy(run_dir, tmp_path) -> Path:
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def edit_config(run: Path, change) -> None:
    config = json.loads((run / "config.json").read_text())
    change(config)
    (run / "config.json").write_text(json.dumps(config))


def script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=HANG_SECONDS)


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(e in last for e in expected), last


def test_a_written_config_holds_each_setting_once_and_loads(run_dir):
    config = json.loads((run_dir / "config.json").read_text())
    assert "epochs" not in config and config["fit_options"]["epochs"] == 2
    run = load_run(run_dir)
    assert run.options.epochs == 2 and run.summary["num_data"] == run.points().shape[0]


@pytest.mark.parametrize("change, expected", [
    (lambda c: c.update(latnet_dim=3), "unknown keys ['latnet_dim']"),
    (lambda c: c.pop("guide"), "missing keys ['guide']"),
    (lambda c: c.update(latent_dim="three"), 'latent_dim must be an integer or null, got "three"'),
    (lambda c: c.update(latent_dim=3.0), "latent_dim must be an integer or null, got 3.0"),
    (lambda c: c.update(latent_dim=0), "latent_dim must be a positive integer, got 0"),
    (lambda c: c.update(hidden_dims=[400, "x"]), "hidden_dims must be a list of integers"),
    (lambda c: c.update(hidden_dims=200), "hidden_dims must be a list of integers or null, got 200"),
    (lambda c: c["fit_options"].update(epoch=3), "fit_options has unknown keys ['epoch']"),
    (lambda c: c.update(likelihood="poisson"), "likelihood must be one of ['bernoulli', "
                                               "'gaussian', \"the model's\"], got \"poisson\""),
    (lambda c: c.update(data_dir=7), "data_dir must be a string or null, got 7"),
    (lambda c: c.update(fit_options=[]), "fit_options must be an object, got []"),
    (lambda c: c["fit_options"].update(epochs="2"), 'fit_options.epochs must be an integer'),
    (lambda c: c["fit_options"].update(jit=1), "fit_options.jit must be true or false, got 1"),
    (lambda c: c["fit_options"].pop("lr"), "fit_options lacks keys ['lr']"),
    (lambda c: c["fit_options"].update(lr=-1.0), "fit_options.lr must be a positive number"),
    (lambda c: c.update(model="no-such-model"), "model 'no-such-model': unknown"),
    # evaluate.py names its output file after the split: no path may come from a config.
    (lambda c: c.update(evaluated_on="../../outside"), "evaluated_on must be one of ['test', "
                                                       "'train']"),
])
def test_a_damaged_config_is_one_error_naming_the_file_and_key(copy, change, expected):
    edit_config(copy, change)
    with pytest.raises(ConfigError) as error:
        load_run(copy)
    message = str(error.value)
    assert message.startswith(f"{copy / 'config.json'}: ") and expected in message, message
    assert "\n" not in message


@pytest.mark.parametrize("text, expected", [
    ('{"data": "synthetic",', "not valid JSON"),
    ("[1, 2]", "expected a JSON object of a run's settings, got a list"),
    ("", "not valid JSON"),
])
def test_a_config_that_is_not_a_settings_object(copy, text, expected):
    (copy / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_run(copy)


def test_a_config_of_the_earlier_format_with_settings_repeated_at_the_top_still_loads(copy):
    edit_config(copy, lambda c: c.update(c["fit_options"]))
    assert load_run(copy).options.epochs == 2


def test_ais_with_too_few_draws_for_k_hat_writes_null_not_nan(run_dir, tmp_path):
    """K < 25 leaves k-hat undefined: the JSON says null (NaN is not JSON), and the command
    ends normally after its work."""
    shutil.copytree(run_dir, tmp_path / "run")
    result = script("scripts/evaluate.py", str(tmp_path / "run"), "--method", "ais", "-K",
                    "10", "--points", "3", "--chains", "2", "--ais-steps", "3", "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    (written,) = (tmp_path / "run").glob("ais-*.json")

    def not_json(constant):
        raise AssertionError(f"{written}: {constant} is not JSON")

    numbers = json.loads(written.read_text(), parse_constant=not_json)
    assert numbers["per_point"]["khat"] == [None, None, None]


@pytest.mark.parametrize("damage, expected", [
    (lambda b: b[: len(b) // 2], "not a readable checkpoint"),
    (lambda b: b"", "not a readable checkpoint"),
    (lambda b: b"\x00" * 64 + b[64:], "not a readable checkpoint"),
])
def test_a_truncated_or_corrupted_checkpoint(copy, damage, expected):
    path = copy / "checkpoint.pt"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ConfigError, match=f"^{path}: {expected}"):
        load_run(copy)


def test_a_checkpoint_with_a_field_of_the_wrong_kind(copy):
    state = torch.load(copy / "checkpoint.pt", weights_only=True)
    torch.save({**state, "epoch": "2"}, copy / "checkpoint.pt")
    with pytest.raises(ConfigError, match="'epoch' must be an integer, got str"):
        load_run(copy)
    del state["rng"]["numpy"]
    torch.save(state, copy / "checkpoint.pt")
    with pytest.raises(ConfigError, match="random streams' states are damaged"):
        load_run(copy)


def test_a_half_line_at_the_end_of_the_metrics_is_refused_by_readers(copy):
    metrics = copy / "metrics.jsonl"
    whole = metrics.read_text()
    # A writer that appended records and was killed mid-line leaves the next epoch's half.
    metrics.write_text(whole + whole.splitlines()[-1][:40])
    run = load_run(copy)
    with pytest.raises(ConfigError, match=r"ends in the middle of a record \(line 3\)"):
        _ = run.history
    metrics.write_text("{not json}\n" + whole)
    with pytest.raises(ConfigError, match="line 1 is not a JSON record"):
        _ = run.history
    metrics.write_text(whole.splitlines()[1] + "\n")
    with pytest.raises(ConfigError, match="line 1 is the record of epoch 2, expected epoch 1's"):
        _ = run.history


def test_resume_drops_the_half_line_and_goes_on(copy, capsys):
    metrics = copy / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 3, "train_obj')
    (copy / ".checkpoint.pt.x1y2.tmp").write_bytes(b"a write a kill cut short")
    run, options = resumed_run(copy, epochs=3)
    assert "dropped the half record a crash left at its end (line 3)" in capsys.readouterr().err
    assert not list(copy.glob(".*.tmp"))
    train(run, options)
    assert [r["epoch"] for r in load_run(copy).history] == [1, 2, 3]


def test_resume_refuses_metrics_that_lost_epochs_the_checkpoint_holds(copy):
    metrics = copy / "metrics.jsonl"
    first, second = metrics.read_text().splitlines()
    metrics.write_text(first + "\n" + second[:30])
    with pytest.raises(ConfigError, match="holds the records of epochs 1 to 1, but the "
                                          "checkpoint is of epoch 2"):
        resumed_run(copy, epochs=3)


def test_a_missing_or_damaged_final_evaluation(copy):
    run = load_run(copy)
    (copy / "diagnostics.json").write_text('{"elbo": ')
    with pytest.raises(ConfigError, match="diagnostics.json: not valid JSON"):
        _ = run.summary
    (copy / "diagnostics.json").unlink()
    with pytest.raises(ConfigError, match=f"diagnostics.json: missing: .* --resume {copy}"):
        _ = run.summary


def test_the_scripts_say_which_file_is_damaged_in_one_line(run_dir, tmp_path):
    bad_config, bad_metrics = tmp_path / "config", tmp_path / "metrics"
    for copy in (bad_config, bad_metrics):
        shutil.copytree(run_dir, copy)
    edit_config(bad_config, lambda c: c.update(latent_dim="three"))
    metrics = bad_metrics / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 3')
    assert_one_line_error(script("scripts/evaluate.py", str(bad_config), "--no-progress"),
                          "config.json: latent_dim must be an integer")
    assert_one_line_error(script("scripts/report.py", str(bad_metrics), "--no-progress",
                                 "--ais-points", "0", "--amortization-points", "0"),
                          "metrics.jsonl: the file ends in the middle of a record")


# -- a run's model file --------------------------------------------------------------------------

MODEL_FILE = LINEAR_PAIR_FILE


@pytest.fixture
def file_run(tmp_path) -> tuple[Path, Path]:
    model_file = tmp_path / "my_model.py"
    model_file.write_text(MODEL_FILE)
    out = tmp_path / "run"
    run, options = new_run({**SETTINGS, "model": f"{model_file}:make", "guide": None,
                            "latent_dim": 2, "epochs": 1}, out)
    train(run, options)
    run.release()  # for the scripts below, which take the run directory over
    return out, model_file


def test_a_run_of_a_model_file_says_it_runs_the_file_and_refuses_a_changed_one(file_run,
                                                                              tmp_path, capsys):
    out, model_file = file_run
    config = json.loads((out / "config.json").read_text())
    assert len(config["model_sha256"]) == 64
    load_run(out, trust_code=True)
    assert capsys.readouterr().err.strip() == (
        f"note: loading the run imports and runs {model_file}:make, named in "
        f"{out / 'config.json'}")
    marker = tmp_path / "changed-file-ran"
    model_file.write_text(f"open({str(marker)!r}, 'w').close()\n" + MODEL_FILE)
    with pytest.raises(ConfigError, match="my_model.py has changed since the run .* "
                                          "trust_model_file=True"):
        load_run(out, trust_code=True)
    assert not marker.exists()
    assert_one_line_error(script("scripts/evaluate.py", str(out), "--no-progress",
                                 "--trust-code"),
                          "has changed since the run", "--trust-model-file")
    assert not marker.exists()
    load_run(out, trust_model_file=True)
    assert marker.exists() and "trusted as asked" in capsys.readouterr().err
    model_file.unlink()
    with pytest.raises(ConfigError, match="my_model.py does not exist here"):
        load_run(out, trust_model_file=True)


def test_a_config_without_the_model_files_digest_needs_trust(file_run):
    out, _ = file_run
    edit_config(out, lambda c: c.pop("model_sha256"))
    with pytest.raises(ConfigError, match="holds no sha256 of its model file"):
        load_run(out, trust_code=True)
    assert load_run(out, trust_model_file=True).options.epochs == 1
