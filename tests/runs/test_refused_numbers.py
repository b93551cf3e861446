"""A number that is not one is said, never written as NaN nor raised as a traceback: NaN and
infinities are null in every file with the site at fault named; settings are range-checked
(finite, positive, bounded); K = 1 gives no gap; damaged counts and nesting are one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from elbogap import ConfigError, DataError, load_run
from elbogap.cli.evaluate import command as evaluate_command
from elbogap.cli.fit import command as fit_command
from elbogap.cli.report import command as report_command
from elbogap.data.readers import load_array
from elbogap.foundations.strict_json import restored, strict_json
from elbogap.runs.run_directory import new_run, train
from tests.pairs import LINEAR_PAIR_FILE

SETTINGS = {"data": "synthetic", "model": "linear-gaussian", "guide": "mean-field",
            "batch_size": 100, "epochs": 1, "eval_every": 1, "eval_samples": 5,
            "num_samples": 10, "progress": False}
FAST = ["--data", "synthetic", "--epochs", "2", "--eval-samples", "30", "--eval-points", "40",
        "--num-samples", "30", "--test-points", "40", "--no-progress"]

# A pair whose observed site's log-density is NaN in evaluation only (its modules in eval mode):
# training goes well, every evaluation meets NaN.
NAN_IN_EVALUATION = LINEAR_PAIR_FILE.replace(
    'pyro.sample("x", dist.Normal(decoder(z), 1.0)',
    'off = 0.0 if decoder.training else float("inf")\n'
    '            pyro.sample("x", dist.Normal(decoder(z) + off, 1.0 + off)')


def strict(text: str):
    """JSON as JSON is: NaN and Infinity refused."""
    def refuse(constant):
        raise AssertionError(f"{constant} in a written file")
    return json.loads(text, parse_constant=refuse)


def last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_nan_in_evaluation_is_null_in_every_file_with_the_site_named(tmp_path, capsys):
    pair = tmp_path / "nan_pair.py"
    pair.write_text(NAN_IN_EVALUATION)
    run = tmp_path / "run"
    assert fit_command([*FAST, "--model", f"{pair}:make", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "not a number" in out and "'x' (model, NaN)" in out
    assert "tails are too light" not in out and "have no k-hat" in out
    summary = strict((run / "diagnostics.json").read_text())
    assert summary["elbo"]["mean"] is None and summary["log_evidence"]["mean"] is None
    assert any("'x' (model, NaN)" in note for note in summary["notes"])
    records = [strict(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["diagnostics"]["elbo"]["mean"] is None
    # Where a number was written as null, the file says so, and a reader gets the NaN back.
    assert {"at": ["diagnostics", "ess", "mean"], "was": "NaN"} in records[0]["non_finite"]
    assert np.isnan(load_run(run, trust_code=True).history[0]["diagnostics"]["ess"]["mean"])
    # Evaluation, the report and a resumed fit go through the same way.
    assert evaluate_command([str(run), "-K", "20", "--trust-code", "--no-progress"]) == 0
    strict((run / "evaluation-test-K20.json").read_text())
    assert report_command([str(run), "-K", "20", "--ais-points", "0", "--amortization-points",
                           "0", "--idata-points", "2", "--trust-code", "--no-progress"]) == 0
    strict((run / "report.json").read_text())
    assert fit_command(["--resume", str(run), "--epochs", "3", "--trust-code",
                        "--no-progress"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_strict_json_round_trip():
    values = {"a": float("nan"), "b": [1.0, float("inf")], "site.with.dots": {"m": -np.inf}}
    text = strict_json(values)
    strict(text)
    back = restored(json.loads(text))
    assert np.isnan(back["a"]) and back["b"] == [1.0, float("inf")]
    assert back["site.with.dots"] == {"m": float("-inf")}


@pytest.mark.parametrize("flags, expected", [
    (["--likelihood-scale", "inf"], "--likelihood-scale: must be a positive number, got inf"),
    (["--likelihood-scale", "nan"], "--likelihood-scale: must be a positive number, got nan"),
    (["--time-budget", "inf"], "--time-budget: must be a positive number, got inf"),
    (["--time-budget", "-1"], "--time-budget: must be a positive number, got -1"),
    (["--epochs", str(2**40)], "--epochs must be at most 2147483647"),
    (["-K", str(10**29)], "--num-samples must be at most 2147483647"),
])
def test_numeric_flags_are_range_checked(flags, expected, tmp_path, capsys):
    assert fit_command([*FAST, "--model", "linear-gaussian", *flags, "--out",
                        str(tmp_path / "run")]) == 2
    assert expected in last_error(capsys)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("numbers") / "run"
    run, options = new_run(SETTINGS, out)
    train(run, options)
    run.release()
    return out


@pytest.fixture
def copy(fitted, tmp_path) -> Path:
    shutil.copytree(fitted, tmp_path / "run")
    return tmp_path / "run"


def test_a_config_with_infinity_or_a_count_that_cannot_finish(copy):
    config = (copy / "config.json").read_text()
    (copy / "config.json").write_text(config.replace('"likelihood_scale": null',
                                                     '"likelihood_scale": Infinity'))
    with pytest.raises(ConfigError, match="not valid JSON .*Infinity is not a JSON number"):
        load_run(copy)
    held = json.loads(config)
    held["num_samples"] = 10**29
    (copy / "config.json").write_text(json.dumps(held))
    with pytest.raises(ConfigError, match=r"num_samples must be at most 2147483647 \(2\^31 - 1\), "
                                          f"got {10**29}"):
        load_run(copy)


def test_a_config_nested_too_deeply(copy):
    (copy / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ConfigError, match="config.json: nested too deeply"):
        load_run(copy)


@pytest.mark.parametrize("key, value", [("epoch", -3), ("records", -1)])
def test_a_checkpoint_with_a_negative_count(copy, key, value):
    state = torch.load(copy / "checkpoint.pt", weights_only=True)
    state[key] = value
    torch.save(state, copy / "checkpoint.pt")
    with pytest.raises(ConfigError, match=f"its '{key}' must be a count of epochs .* got "
                                          f"{value}"):
        load_run(copy)


def test_one_draw_gives_no_gap_and_says_why(fitted, capsys):
    assert evaluate_command([str(fitted), "-K", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "evidence gap  log p(x) - ELBO" in out and "K = 1: no evidence gap" in out
    gap_row = next(line for line in out.splitlines() if line.startswith("evidence gap"))
    assert gap_row.endswith("not a number")
    summary = strict((fitted / "evaluation-test-K1.json").read_text())
    assert summary["evidence_gap"] == {"mean": None, "se": None}
    assert summary["log_evidence"]["mean"] is not None


def test_values_beyond_float32_in_a_float64_file(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 3))
    x[4, 1] = 1e39
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(DataError, match=r"x.npy: 1 values beyond float32's range .* in rows "
                                        r"\[4\]: .* rescale"):
        load_array(tmp_path / "x.npy")


UNDERFLOWING_GUIDE = '''
import pyro, pyro.distributions as dist, torch


def make(data_dim):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True).expand(x.shape), 1.0)
                        .to_event(1), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.zeros(2))
        with pyro.plate("data", x.shape[0]):
            # exp(-200) is 0 in float32: a scale that underflowed.
            pyro.sample("z", dist.Normal(loc, torch.tensor(-200.0).exp()).to_event(1))

    return model, guide
'''


def test_a_scale_that_underflows_is_not_blamed_on_parameters_per_point(tmp_path, capsys):
    pair = tmp_path / "underflow.py"
    pair.write_text(UNDERFLOWING_GUIDE)
    assert fit_command([*FAST, "--model", f"{pair}:make", "--out", str(tmp_path / "run")]) == 2
    line = last_error(capsys)
    assert "parameters per data point" not in line and "scale" in line, line


SLASHED_SITES = '''
import pyro, pyro.distributions as dist, torch
from torch import nn


def make(data_dim):
    encoder = nn.Linear(data_dim, 2)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("layer/0", dist.Normal(torch.zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.expand(x.shape), 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = encoder(x).chunk(2, -1)
            pyro.sample("layer/0", dist.Normal(loc, log_scale.exp()).to_event(1))

    return model, guide
'''


def test_a_site_named_with_a_slash_is_written_to_netcdf(tmp_path):
    import arviz

    pair = tmp_path / "slashed.py"
    pair.write_text(SLASHED_SITES)
    run = tmp_path / "run"
    assert fit_command([*FAST, "--model", f"{pair}:make", "--out", str(run)]) == 0
    assert report_command([str(run), "-K", "20", "--ais-points", "0", "--amortization-points",
                           "0", "--idata-points", "2", "--trust-code", "--no-progress"]) == 0
    idata = arviz.from_netcdf(run / "inference_data.nc")
    assert list(idata.posterior.data_vars) == ["layer\u22150"]
    assert json.loads(idata.posterior.attrs["renamed"])["layer\u22150"] == "layer/0"
