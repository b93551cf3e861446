"""A run directory is never mixed or overwritten behind a user's back: one owner at a time,
--overwrite moves the old run aside before writing anything, --resume of a run without a
checkpoint starts it again from its own settings, a full disk is one line."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from elbogap import final_summary
from elbogap.runs.ownership import lock_path
from elbogap.runs.run_directory import new_run, train
from tests.cli.test_scripts import load_script
from tests.limits import HANG_SECONDS

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--epochs", "3", "--num-samples", "20", "--eval-samples", "10", "--eval-points", "50",
        "--no-progress"]


def fit(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-u", str(ROOT / "scripts" / "fit.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def finished(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=HANG_SECONDS, **kwargs)


def wait_for_line(process: subprocess.Popen, text: str) -> None:
    for line in process.stdout:
        if text in line:
            return
    raise AssertionError(f"no line with {text!r}: {process.stderr.read()[-3000:]}")


@pytest.mark.slow
def test_one_owner_at_a_time_and_overwrite_moves_the_old_run_aside(tmp_path):
    run = tmp_path / "run"
    done = finished("scripts/fit.py", *FAST, "--out", str(run))
    assert done.returncode == 0, done.stderr
    # A long fit replaces the finished run: its results are gone before its config is written.
    long = fit(*FAST, "--epochs", "500", "--seed", "1", "--out", str(run), "--overwrite")
    wait_for_line(long, "run directory")
    assert not (run / "diagnostics.json").exists() and not list(run.glob("*.png"))
    assert json.loads((run / "config.json").read_text())["fit_options"]["seed"] == 1
    # While it trains, a second fit and an evaluation of the same directory are refused.
    second = finished("scripts/fit.py", *FAST, "--out", str(run), "--overwrite")
    evaluation = finished("scripts/evaluate.py", str(run), "--no-progress")
    for refused in (second, evaluation):
        assert refused.returncode == 2, refused.stderr[-2000:]
        last = refused.stderr.strip().splitlines()[-1]
        assert f"in use by scripts/fit.py (pid {long.pid} on " in last, last
    long.send_signal(signal.SIGKILL)
    long.wait()
    assert lock_path(run).exists()  # what a kill leaves: a lock the kernel no longer holds
    # The next owner takes it over, says so, and replaces that run with its own, whole.
    third = finished("scripts/fit.py", *FAST, "--seed", "7", "--out", str(run), "--overwrite")
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"scripts/fit.py (pid {long.pid} on" in third.stderr
    assert "ended without releasing it; taking it over" in third.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["fit_options"]["seed"] == 7
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert not lock_path(run).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing moved aside is left


def test_resume_without_a_checkpoint_starts_again_from_the_runs_own_settings(tmp_path, capsys):
    """Killed before its first epoch ended, a run holds its config alone: --resume starts it
    again with that config (never the flags' defaults)."""
    out = tmp_path / "run"
    run, _ = new_run({"epochs": 2, "seed": 5, "num_samples": 20, "eval_samples": 10,
                      "eval_points": 50, "latent_dim": 4, "progress": False}, out)
    run.release()
    fit_script = load_script("fit")
    assert fit_script.command(["--resume", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "starting the run again from its own settings" in captured.out
    config = json.loads((out / "config.json").read_text())
    assert config["fit_options"]["seed"] == 5 and config["latent_dim"] == 4
    assert [json.loads(line)["epoch"]
            for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # A directory with results but no checkpoint (lost) is refused unless --overwrite.
    (out / "checkpoint.pt").unlink()
    assert fit_script.command(["--resume", str(out), "--no-progress"]) == 2
    assert "but no checkpoint.pt to continue from; pass --overwrite" in capsys.readouterr().err
    assert fit_script.command(["--resume", str(out), "--overwrite", "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["latent_dim"] == 4
    # Flags that would change the run are refused, as with a checkpoint.
    shutil.rmtree(out)
    run, _ = new_run({"epochs": 2, "latent_dim": 4, "progress": False}, out)
    run.release()
    assert fit_script.command(["--resume", str(out), "--latent-dim", "6"]) == 2
    assert "--latent-dim would be ignored" in capsys.readouterr().err


def limited_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_the_files_as_they_were(tmp_path):
    """Writes beyond a size limit fail (EFBIG, as a full disk fails with ENOSPC): each command
    ends with one line naming the file, and what was there stays whole."""
    run = tmp_path / "run"
    fitted, options = new_run({"epochs": 2, "num_samples": 20, "eval_samples": 10,
                               "eval_points": 50, "progress": False}, run)
    train(fitted, options)
    final_summary(fitted, progress=False)  # (which gives the run up for the scripts below)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    commands = {
        "fit": ["scripts/fit.py", *FAST, "--out", str(tmp_path / "other")],
        "evaluate": ["scripts/evaluate.py", str(run), "-K", "10", "--no-progress"],
        "report": ["scripts/report.py", str(run), "-K", "10", "--ais-points", "0",
                   "--amortization-points", "0", "--idata-points", "1", "--idata-draws", "5",
                   "--no-progress"],
    }
    expected = {"fit": ": cannot write it (File too large)",
                "evaluate": "evaluation-test-K10.json: cannot write it (File too large)",
                "report": ": cannot write it (File too large)"}
    for name, command in commands.items():
        result = finished(*command, preexec_fn=limited_file_size(2048))
        assert result.returncode == 2, (name, result.stderr[-3000:])
        assert "Traceback" not in result.stderr, name
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and expected[name] in last, (name, last)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert not list(run.glob(".*"))
