"""A run killed or interrupted from outside resumes exactly; flags that cannot work are one clear
line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from elbogap.training.fitting import CHECKPOINT

ROOT = Path(__file__).resolve().parents[2]


RUN = ["--epochs", "12", "--num-samples", "20", "--eval-every", "3", "--eval-samples", "10",
       "--no-progress"]


def fit_command(*args):
    return [sys.executable, str(ROOT / "scripts" / "fit.py"), *args]


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def wait_for_epochs(run_dir, epochs, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= epochs:
            return
        if process.poll() is not None:
            raise AssertionError(f"fit ended early: {process.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("fit did not get far enough in time")


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_numbers(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(fit_command(*RUN, "--out", str(whole)), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    process = subprocess.Popen(fit_command(*RUN, "--out", str(killed)), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for_epochs(killed, 5, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # Still loadable; metrics are written just before the checkpoint, so a kill between the two
    # leaves it one epoch behind them (--resume then redoes that epoch).
    assert torch.load(killed / CHECKPOINT, weights_only=False)["epoch"] >= 4
    resumed = subprocess.run(fit_command("--resume", str(killed), "--no-progress"),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    assert records(killed) == records(whole)
    final = [json.loads((d / "diagnostics.json").read_text()) for d in (whole, killed)]
    assert final[0] == final[1]


@pytest.mark.slow
def test_ctrl_c_exits_cleanly_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    # A shell without job control starts background jobs with SIGINT ignored, and Python then
    # keeps it ignored: give the child the default disposition, as a terminal would.
    process = subprocess.Popen(fit_command(*RUN, "--epochs", "500", "--out", str(run)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_epochs(run, 3, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-3000:]
    assert "interrupted during epoch" in err and f"--resume {run}" in err
    assert "Traceback" not in err
    epoch = torch.load(run / CHECKPOINT, weights_only=False)["epoch"]
    # An interrupt between writing an epoch's metrics and its checkpoint leaves one record more
    # than the checkpoint holds; --resume drops it and redoes that epoch.
    assert len((run / "metrics.jsonl").read_text().splitlines()) in (epoch, epoch + 1)


def test_resume_into_another_out_is_refused(tmp_path):
    result = subprocess.run(fit_command("--resume", str(tmp_path / "a"), "--out",
                                        str(tmp_path / "b")), capture_output=True, text=True)
    assert result.returncode == 2 and "--resume RUN_DIR continues RUN_DIR" in result.stderr


def test_non_binary_data_under_a_bernoulli_likelihood(tmp_path):
    np.save(tmp_path / "grey.npy", np.random.RandomState(0).rand(40, 5))
    result = subprocess.run(fit_command("--data", "array", "--data-dir", str(tmp_path / "grey.npy"),
                                        "--likelihood", "bernoulli", "--out", str(tmp_path / "r")),
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "--likelihood bernoulli needs data of 0s and 1s" in result.stderr
    assert "--likelihood gaussian" in result.stderr and "Traceback" not in result.stderr


def test_signal_module_is_posix():
    assert hasattr(signal, "SIGKILL") and os.name == "posix"
