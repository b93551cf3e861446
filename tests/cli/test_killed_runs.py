"""A run killed or interrupted from outside resumes exactly; flags that cannot work are one clear
line."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from elbogap.training.fitting import CHECKPOINT
from tests.limits import HANG_SECONDS

ROOT = Path(__file__).resolve().parents[2]


RUN = ["--epochs", "8", "--num-samples", "20", "--eval-every", "2", "--eval-samples", "10",
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


# scripts/fit.py with a fault to be caught in: the Nth atomic write of a file (in this process)
# writes half its bytes, says so in a marker file and waits there to be killed.
FIT_WITH_A_FAULT = """
import io, pathlib, sys, time
import elbogap.foundations.atomic as atomic
import elbogap.training.checkpoint as checkpoint
from elbogap.cli.fit import command

target, nth, marker = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])
original, writes = atomic.write_atomic, []


def write_atomic(path, write):
    if pathlib.Path(path).name == target:
        writes.append(path)
        if len(writes) == nth:
            def half_then_wait(f):
                buffer = io.BytesIO()
                write(buffer)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                marker.touch()
                time.sleep(600)
            return original(path, half_then_wait)
    return original(path, write)


atomic.write_atomic = checkpoint.write_atomic = write_atomic
sys.exit(command(sys.argv[4:]))
"""


def wait_for(condition, process, timeout=HANG_SECONDS):
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None or time.time() > deadline:
            return False
        time.sleep(0.02)
    return True


def assert_readable(run_dir):
    """What a kill leaves is never a damaged file in place of a good one."""
    from elbogap.runs.recorded import read_history
    from elbogap.training.checkpoint import read_checkpoint

    history = read_history(run_dir / "metrics.jsonl")
    if (run_dir / CHECKPOINT).is_file():
        assert read_checkpoint(run_dir / CHECKPOINT)["epoch"] <= len(history)


@pytest.mark.slow
def test_sigkill_at_random_moments_and_mid_write_then_resume_reproduces_the_run(tmp_path):
    """Killed (SIGKILL) at seeded random moments and in the middle of writing the checkpoint,
    the metrics and the final diagnostics, restarted each time with the command that started
    it (as torchrun --max-restarts does): the run ends with the uninterrupted run's numbers."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # Random moments fall in what follows a run's first line (the run, not its imports).
    with open(tmp_path / "out-whole", "w") as stdout:
        process = subprocess.Popen([sys.executable, "-u", *fit_command(*RUN, "--out",
                                                                       str(whole))[1:]],
                                   stdout=stdout, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: "run directory" in (tmp_path / "out-whole").read_text(), process)
    begun = time.time()
    assert process.wait(timeout=600) == 0, (tmp_path / "out-whole").read_text()[-3000:]
    training = time.time() - begun
    wrapper = tmp_path / "fit_with_a_fault.py"
    wrapper.write_text(FIT_WITH_A_FAULT)
    rng = random.Random(2026)
    faults = [("checkpoint.pt", 2), ("metrics.jsonl", 2),
              *[("random", rng.uniform(0, training)) for _ in range(3)], ("diagnostics.json", 1)]
    restart = [*RUN, "--resume", str(killed), "--out", str(killed)]
    for number, (target, when) in enumerate(faults):
        marker, out = tmp_path / f"fault-{number}", tmp_path / f"out-{number}"
        with open(out, "w") as stdout:
            process = subprocess.Popen(
                [sys.executable, "-u", str(wrapper), target,
                 str(when if target != "random" else 0), str(marker), *restart],
                cwd=ROOT, stdout=stdout, stderr=subprocess.STDOUT, text=True)
        if target == "random":
            wait_for(lambda out=out: "resuming" in out.read_text(), process)
            begun = time.time()
            wait_for(lambda deadline=begun + when: time.time() > deadline, process)
        else:
            assert wait_for(marker.exists, process), (target, out.read_text()[-3000:])
            assert list(killed.glob(f".{target}.*.tmp")), "the write was not caught half done"
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert_readable(killed)
    resumed = subprocess.run(fit_command(*restart), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    assert records(killed) == records(whole)
    final = [json.loads((d / "diagnostics.json").read_text()) for d in (whole, killed)]
    assert final[0] == final[1]
    assert not list(killed.glob(".*.tmp"))


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
