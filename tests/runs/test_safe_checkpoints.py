"""Checkpoints are data: read with weights_only=True; a pickle that would run code is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from elbogap import ConfigError, load_run
from elbogap.foundations.rng import rng_state
from elbogap.runs.run_directory import new_run, train
from elbogap.training.checkpoint import convert_trusted_checkpoint
from tests.limits import HANG_SECONDS

ROOT = Path(__file__).resolve().parents[2]


class Payload:
    """What a crafted checkpoint carries: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safe") / "run"
    run, options = new_run({"data": "synthetic", "model": "linear-gaussian",
                            "guide": "mean-field", "batch_size": 100, "epochs": 2,
                            "eval_every": 1, "eval_samples": 5, "num_samples": 10,
                            "progress": False}, out)
    train(run, options)
    return out


def test_a_checkpoint_of_this_version_is_plain_data(run_dir):
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert set(state) >= {"params", "optimizer", "rng", "epoch"}
    run = load_run(run_dir)
    # The random streams come back as they were saved.
    assert isinstance(run.state["rng"]["numpy"][1], np.ndarray)


def test_a_crafted_checkpoint_is_refused_and_its_payload_never_runs(run_dir, tmp_path):
    crafted = tmp_path / "run"
    crafted.mkdir()
    for f in run_dir.iterdir():
        if f.is_file():
            (crafted / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "payload-ran"
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["params"]["extra"] = Payload(marker)
    torch.save(state, crafted / "checkpoint.pt")
    with pytest.raises(ConfigError, match="holds objects other than tensors"):
        load_run(crafted)
    for command in (["scripts/evaluate.py", str(crafted), "-K", "5", "--no-progress"],
                    ["scripts/report.py", str(crafted), "--no-progress"],
                    ["scripts/fit.py", "--resume", str(crafted), "--no-progress"]):
        result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True,
                                text=True, timeout=HANG_SECONDS)
        assert result.returncode == 2, (command, result.stderr[-2000:])
        last = result.stderr.strip().splitlines()[-1]
        assert "checkpoint.pt: holds objects other than tensors" in last, command
        assert "Traceback" not in result.stderr
    assert not marker.exists()


def test_an_old_checkpoint_is_refused_until_converted(run_dir, tmp_path):
    """Checkpoints of earlier versions held NumPy's random state as an array: refused, with the
    conversion named; converted (by someone who trusts the file), the run loads."""
    old = tmp_path / "run"
    old.mkdir()
    for f in run_dir.iterdir():
        if f.is_file():
            (old / f.name).write_bytes(f.read_bytes())
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["rng"] = rng_state()
    torch.save(state, old / "checkpoint.pt")
    with pytest.raises(ConfigError, match="convert_trusted_checkpoint"):
        load_run(old)
    convert_trusted_checkpoint(old / "checkpoint.pt")
    run = load_run(old)
    assert torch.load(old / "checkpoint.pt", weights_only=True)["epoch"] == run.state["epoch"]
