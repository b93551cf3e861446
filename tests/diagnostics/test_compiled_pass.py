"""The compiled evaluation pass: the eager pass's numbers, or the eager pass with the reason."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from elbogap import evaluate
from elbogap.data.readers import load_digits
from elbogap.diagnostics.compiled_pass import CompiledPass, _flat
from elbogap.foundations.conventions import inspect_pair
from elbogap.foundations.data_plate import program_pair
from elbogap.guides.mean_field import MeanFieldGuide
from elbogap.models.vae import VAE


def small_vae():
    pyro.clear_param_store()
    torch.manual_seed(0)
    return VAE(64, 4, (16,)), MeanFieldGuide(64, 4, (16,)), load_digits().test[:20]


def test_the_compiled_pass_gives_the_eager_log_weights():
    """Random operations run as torch's own in the compiled pass: with the same seed, the same
    draws, so the log-weights agree to float32 rounding, chunk for chunk."""
    vae, enc, x = small_vae()
    runs = {}
    for compiled in (False, True):
        pyro.set_rng_seed(3)
        runs[compiled] = evaluate(vae.model, enc.guide, x, num_samples=100, batch_size=10,
                                  rows_per_chunk=200, compiled=compiled, keep_log_weights=True)
    used = [n for n in runs[True].notes if "compiled pass" in n]
    # 2 batches x 5 chunks: the first chunk eager, the next two checked, the rest compiled.
    assert used and used[0].startswith("7 chunk(s)"), runs[True].notes
    torch.testing.assert_close(runs[True].log_weights, runs[False].log_weights,
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(runs[True].kl_prior, runs[False].kl_prior)


def test_a_recording_that_disagrees_with_the_eager_pass_is_never_used():
    vae, enc, x = small_vae()
    program = program_pair(vae.model, enc.guide, (x[:10],), {})
    layout = inspect_pair(program.model, program.guide, program.data, program.data_plate)
    compiled = CompiledPass(program.data_plate, enabled=True)
    key = compiled._key(program.data, 5)
    eager = compiled._eager(program.model, program.guide, program.data, layout, 5)
    tensors, spec = _flat(eager)
    # A recording that got one value wrong (as a Python number baked into it would).
    def wrong(*_):
        return (tensors[0] + 1.0, *tensors[1:])

    compiled.recordings[key] = (wrong, spec, True)
    terms = compiled.particles(program.model, program.guide, program.data, layout, 5)
    assert compiled.reason.startswith("the compiled pass disagreed with the eager one "
                                      "(log_weight: largest difference")
    assert terms.log_weight.shape == (5, 10) and compiled.used == 0
    assert "evaluated eagerly" in compiled.note()


def test_a_pass_whose_python_reads_a_value_is_evaluated_eagerly_with_the_reason():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        # A branch on a value: a recording would bake in the branch of the first chunk.
        shift = 1.0 if x.sum().item() > 0 else -1.0
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.5 * x + shift, 0.8))

    x = torch.linspace(-1, 2, 12)
    runs = {}
    for compiled in (False, True):
        pyro.set_rng_seed(0)
        runs[compiled] = evaluate(model, guide, x, num_samples=30, rows_per_chunk=60,
                                  compiled=compiled)
    assert any(n.startswith("no compiled pass: the pass could not be recorded")
               for n in runs[True].notes), runs[True].notes
    torch.testing.assert_close(runs[True].log_evidence, runs[False].log_evidence)
