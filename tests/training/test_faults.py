"""Faults during training are survived: non-finite steps skipped and counted, a run of them
stopped with the last good checkpoint kept, a crash while writing a checkpoint harmless."""

import math

import pyro
import pytest
import torch

from elbogap.data.dataset import Dataset
from elbogap.data.readers import load_digits
from elbogap.guides.mean_field import MeanFieldGuide
from elbogap.models.vae import VAE
from elbogap.training import checkpoint as checkpoint_module
from elbogap.training.checkpoint import load_checkpoint, save_checkpoint
from elbogap.training.fitting import CHECKPOINT, TrainingError, fit
from elbogap.training.options import FitOptions


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




def test_a_batch_larger_than_a_tiny_data_set_is_refused():
    tiny = Dataset("tiny", torch.zeros(3, 2), torch.zeros(1, 2), None, "gaussian")
    with pytest.raises(Exception, match="larger than the training set"):
        fit(lambda x: None, lambda x: None, tiny, FitOptions(batch_size=4, progress=False))
