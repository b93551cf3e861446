"""Bad input ends in one clear error; faults are survived; a killed run resumes exactly."""

import gzip
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guides.mean_field import MeanFieldGuide
from inference.data.datasets import Dataset, load_array, load_digits, load_frey_face, read_amat, read_idx
from inference.diagnostics.evaluation import evaluate
from inference.errors import ConventionError, DataError
from inference.training import checkpoint as checkpoint_module
from inference.training.checkpoint import load_checkpoint, save_checkpoint
from inference.training.fitting import CHECKPOINT, FitOptions, TrainingError, fit
from models.vae import VAE

ROOT = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---- every parser raises only DataError on arbitrary bytes ------------------------------------


@FUZZ
@given(raw=st.binary(max_size=400), gz=st.booleans(), magic=st.sampled_from([2049, 2051]))
def test_fuzz_idx(tmp_path, raw, gz, magic):
    path = tmp_path / ("f.gz" if gz else "f")
    path.write_bytes(gzip.compress(raw) if gz and raw[:1] == b"\x00" else raw)
    try:
        read_idx(path, magic)
    except DataError:
        pass


@FUZZ
@given(raw=st.one_of(st.binary(max_size=400),
                     st.text(alphabet="01 \n\r\t.-2e", max_size=400).map(str.encode)))
def test_fuzz_amat(tmp_path, raw):
    path = tmp_path / "f.amat"
    path.write_bytes(raw)
    try:
        read_amat(path, width=4)
    except DataError:
        pass


@FUZZ
@given(raw=st.binary(max_size=600))
def test_fuzz_frey_mat(tmp_path, raw):
    path = tmp_path / "frey_rawface.mat"
    path.write_bytes(b"MATLAB 5.0 MAT-file" + raw if raw[:1] == b"\x01" else raw)
    try:
        load_frey_face(path)
    except DataError:
        pass


@FUZZ
@given(raw=st.binary(max_size=400), suffix=st.sampled_from([".npy", ".npz", ".csv", ".txt"]))
def test_fuzz_user_arrays(tmp_path, raw, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(raw)
    try:
        load_array(path)
    except DataError:
        pass


# ---- model/guide pairs that break the conventions --------------------------------------------


def model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)


def test_guide_with_the_wrong_shape_is_named():
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))

    with pytest.raises(ConventionError, match="site 'z': the guide samples shape \\(4, 2\\) but "
                                              "the model's distribution there has shape \\(4, 3\\)"):
        evaluate(model, guide, torch.randn(4, 1), num_samples=2)


def test_a_guide_that_crashes_is_reported_as_such():
    def guide(x):
        raise RuntimeError("shapes do not match")

    with pytest.raises(ConventionError, match="the guide failed when called on x of shape"):
        evaluate(model, guide, torch.randn(4, 1), num_samples=2)


# ---- faults during training ------------------------------------------------------------------


class PoisonedVAE(VAE):
    """A VAE whose likelihood turns NaN on the calls listed in ``poisoned``, or on every call
    once ``poison_all`` is set."""

    def __init__(self, poisoned=()):
        super().__init__(64, 4, (16,))
        self.poisoned = poisoned
        self.poison_all = False
        self.calls = 0

    def model(self, x):
        # Training steps only: the convention checks before training run without gradients.
        self.calls += torch.is_grad_enabled()
        if self.poison_all or self.calls in self.poisoned:
            x = x * math.nan
        with pyro.validation_enabled(False):
            super().model(x)


def test_a_few_nonfinite_steps_are_skipped_and_counted():
    data = load_digits()
    vae, enc = PoisonedVAE(poisoned={3, 4, 28}), MeanFieldGuide(64, 4, (16,))
    # The faults are keyed to the model's call count: Python state no recording sees.
    result = fit(vae.model, enc.guide, data, FitOptions(epochs=2, eval_every=2, eval_samples=5,
                                                        progress=False, jit=False))
    assert result.step.skipped == 3
    assert result.history[-1]["skipped_steps"] == 3
    assert all(torch.isfinite(p).all() for _, p in pyro.get_param_store().named_parameters())


def test_a_run_of_nonfinite_steps_stops_training_and_keeps_the_checkpoint(tmp_path):
    data = load_digits()
    vae, enc = PoisonedVAE(), MeanFieldGuide(64, 4, (16,))

    def poison_after_first_epoch(record):
        vae.poison_all = True

    with pytest.raises(TrainingError, match="10 steps in a row .* epoch 2, step 10: the learning"
                                            ".*checkpoint.pt of epoch 1, the last complete one, "
                                            "is intact"):
        fit(vae.model, enc.guide, data, FitOptions(epochs=5, eval_samples=5, progress=False),
            tmp_path, on_epoch=poison_after_first_epoch)
    pyro.clear_param_store()
    vae2, enc2 = VAE(64, 4, (16,)), MeanFieldGuide(64, 4, (16,))
    state = load_checkpoint(tmp_path / CHECKPOINT, vae2.model, enc2.guide, data.test[:2])
    assert state["epoch"] == 1
    assert all(torch.isfinite(p).all() for _, p in pyro.get_param_store().named_parameters())


def test_divergence_before_the_first_epoch_ends_says_there_is_no_checkpoint(tmp_path):
    vae, enc = PoisonedVAE(), MeanFieldGuide(64, 4, (16,))
    vae.poison_all = True
    with pytest.raises(TrainingError, match="no epoch was completed, so there is no checkpoint"):
        fit(vae.model, enc.guide, load_digits(), FitOptions(epochs=2, progress=False), tmp_path)


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT
    pyro.param("w", torch.ones(3))
    save_checkpoint(path, None, epoch=1)
    before = path.read_bytes()

    def dying_save(obj, buffer):
        buffer.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, None, epoch=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]  # no temporary left behind


# ---- killed runs -----------------------------------------------------------------------------

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


def test_empty_and_tiny_data_sets(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 3)))
    with pytest.raises(DataError, match="expected \\(data points >= 2, features\\)"):
        load_array(tmp_path / "empty.npy")
    tiny = Dataset("tiny", torch.zeros(3, 2), torch.zeros(1, 2), None, "gaussian")
    with pytest.raises(Exception, match="larger than the training set"):
        fit(lambda x: None, lambda x: None, tiny, FitOptions(batch_size=4, progress=False))


def test_signal_module_is_posix():
    assert hasattr(signal, "SIGKILL") and os.name == "posix"
