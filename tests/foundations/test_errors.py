"""A bad setting is named as its caller knows it: by its Python name in Python, by its flag on
the command line; and no library call changes process-wide settings on its own."""

import subprocess
import sys

import pytest

from elbogap.cli import evaluate as evaluate_command
from elbogap.cli import fit as fit_command
from elbogap.foundations.errors import ConfigError, OptionError, check_positive
from elbogap.training.options import FitOptions
from tests.limits import HANG_SECONDS


def test_an_option_error_reads_in_python_names_and_in_flags():
    error = OptionError("num_samples", "must be a positive integer, got 0")
    assert str(error) == "num_samples must be a positive integer, got 0"
    assert error.for_flags({"num_samples": "--num-samples"}) == \
        "--num-samples must be a positive integer, got 0"
    # Where the message names the setting twice, both are the caller's words.
    twice = OptionError("batch_size", "{option} 500 is too large: use {option} 100")
    assert twice.for_flags({"batch_size": "--batch-size"}) == \
        "--batch-size 500 is too large: use --batch-size 100"
    assert isinstance(error, ConfigError)


def test_fit_options_name_their_fields_for_a_python_caller():
    for field, value in (("epochs", 0), ("lr", -1.0), ("lr_schedule", "linear"),
                         ("kl_warmup", -1), ("max_nonfinite_steps", 0)):
        with pytest.raises(OptionError) as caught:
            FitOptions(**{field: value}).check(100)
        assert str(caught.value).startswith(f"{field} ") and "--" not in str(caught.value)
    with pytest.raises(OptionError, match="^num_samples must be a positive integer, got 0$"):
        check_positive(num_samples=0)


@pytest.mark.parametrize("command, args, line", [
    (fit_command, ["--epochs", "0"], "error: --epochs must be a positive integer, got 0"),
    (fit_command, ["--lr-schedule", "cosine", "--lr-factor", "2"],
     "error: --lr-factor must be between 0 and 1, got 2.0"),
    # load_dataset calls it path; the command line --data-dir.
    (fit_command, ["--data", "mnist"], "error: data set 'mnist' is read from files: pass their "
                                       "directory (--data-dir)"),
    (fit_command, ["--time-budget", "-1"],
     "error: argument --time-budget: must be a positive number, got -1 (see --help)"),
    # annealed_evidence calls it num_steps; the command line --ais-steps.
    (evaluate_command, ["RUN", "--ais-steps", "0"],
     "error: --ais-steps must be a positive integer, got 0"),
])
def test_the_command_line_names_the_same_settings_by_their_flags(tmp_path, capsys, command, args,
                                                                   line):
    args = [a.replace("RUN", str(tmp_path)) for a in args]
    assert command.command([*args, "--no-progress", "--out", str(tmp_path / "run")]
                           if command is fit_command else args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [line]


PROBE = """
import ctypes, torch
calls = []
real = ctypes.CDLL
ctypes.CDLL = lambda name, *a, **k: calls.append(name) or real(name, *a, **k)
import pyro, pyro.distributions as dist
from elbogap import evaluate

def model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

def guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x, 1.0).to_event(1))

evaluate(model, guide, torch.randn(50, 2), num_samples=200)
denormal = (torch.tensor([1e-30]) * torch.tensor([1e-10])).item()
print(calls, denormal > 0)
"""


def test_evaluate_leaves_the_process_settings_alone():
    """No allocator setting through libc, no denormal flushing: those are configure_cpu's,
    called by the scripts or by the user."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=HANG_SECONDS, check=True).stdout.split()
    assert out == ["[]", "True"]
