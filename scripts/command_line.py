"""What every command-line entry point shares: its help format, shared groups of flags, and
elbogap's errors turned into one line on stderr, a setting named by its flag."""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import NoReturn

from elbogap.foundations.cpu import configure_cpu
from elbogap.foundations.device import DEVICES
from elbogap.foundations.errors import ElbogapError, OptionError
from elbogap.training.elbo_step import ELBOS
from elbogap.training.fitting import TrainingInterrupted
from elbogap.training.options import FitOptions
from elbogap.training.schedule import LR_SCHEDULES


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: not where the help already states it, not for switches (a
    store_false flag's default True reads as if the switch were on), not for None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default in (None, argparse.SUPPRESS)
                or isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)):
            return text
        return super()._get_help_string(action)


def on_first_rank() -> bool:
    """Whether this process speaks for the command: not a rank > 0 of torchrun (RANK), whose
    errors rank 0 states once."""
    return os.environ.get("RANK", "0") == "0"


class CommandParser(argparse.ArgumentParser):
    """argparse's parser with elbogap's help format and one-line errors: ``error: …`` and exit
    code 2, without the usage block first (``--help`` shows it), once under torchrun."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        if on_first_rank():
            print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def add_training_controls(parser: argparse.ArgumentParser, o: FitOptions) -> None:
    """The flags of ``FitOptions``' objective (``--elbo`` and its settings, the KL weight of
    ``elbogap.training.kl_weight``) and training controls (``elbogap.training.schedule``,
    clipping, early stopping), defaults from ``o``."""
    g = parser.add_argument_group("objective")
    g.add_argument("--num-particles", type=int, default=o.num_particles, help="ELBO samples per step")
    g.add_argument("--elbo", choices=tuple(ELBOS), default=o.elbo,
                   help="Trace_ELBO, TraceMeanField_ELBO (analytic KL in the loss), TraceEnum_ELBO "
                        "(config_enumerate'd discrete sites), TraceGraph_ELBO (score-function "
                        "gradients of non-reparameterizable sites with their downstream costs "
                        "and baselines), or iwae (the importance-weighted bound per data point "
                        "with --num-particles K; Renyi with --renyi-alpha)")
    g.add_argument("--renyi-alpha", type=float, default=o.renyi_alpha,
                   help="order of the Renyi bound of --elbo iwae (0: IWAE)")
    g.add_argument("--beta", type=float, default=o.beta, help="weight of the KL to the prior in "
                   "the training objective (beta-VAE); diagnostics are always at weight 1")
    g.add_argument("--kl-warmup", type=int, default=o.kl_warmup, metavar="EPOCHS",
                   help="raise the KL weight linearly from 0 to --beta over this many epochs")
    g = parser.add_argument_group("training controls")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=o.lr_schedule,
                   help="cosine: down to 0 over --epochs; step: times --lr-factor every "
                   "--lr-step-epochs; plateau: times --lr-factor after --lr-patience epochs "
                   "without a better validation ELBO (training objective without --val-fraction)")
    g.add_argument("--lr-factor", type=float, default=o.lr_factor,
                   help="the learning rate's multiplier at each step or plateau decay")
    g.add_argument("--lr-step-epochs", type=int, default=o.lr_step_epochs,
                   help="epochs between decays of --lr-schedule step")
    g.add_argument("--lr-patience", type=int, default=o.lr_patience,
                   help="epochs without progress before a decay of --lr-schedule plateau")
    g.add_argument("--clip-norm", type=float, help="clip the gradients' global norm to this")
    g.add_argument("--patience", type=int, help="stop once the validation ELBO has not risen "
                   "for this many epochs, keeping the best epoch's parameters (needs "
                   "--val-fraction)")


def positive_number(text: str) -> float:
    """argparse's type of a setting that is a finite number > 0 (a scale, a time budget)."""
    value = float(text)  # a ValueError is argparse's "invalid positive_number value"
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def parse_hidden_dims(text: str) -> tuple[int, ...]:
    """``"400"`` or ``"400,200"``; an empty string means no hidden layer."""
    try:
        dims = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise OptionError("hidden_dims", f"{{option}} {text!r}: expected comma-separated "
                          "integers") from None
    if any(d < 1 for d in dims):
        raise OptionError("hidden_dims", f"{{option}} {text!r}: sizes must be positive")
    return dims


def add_device_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                    default: str = "auto", what: str = "everything") -> None:
    parser.add_argument("--device", default=default,
                        help=f"where {what} runs: {DEVICES}; auto: the GPU (one per process "
                             "under torchrun, LOCAL_RANK) when CUDA is available, else the CPU")


def add_trust_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--trust-code`` and ``--trust-model-file``: your word that a run's code may run."""
    parser.add_argument("--trust-code", action="store_true",
                        help="load a run whose model is code (config.json's model names a "
                             "Python file or a module, not a registered name): it is imported "
                             "and run, so only for a run you trust")
    parser.add_argument("--trust-model-file", action="store_true",
                        help="with --trust-code implied: load a run whose model file changed "
                             "since the run, or whose config holds no sha256 of it: the file "
                             "as it is now is imported and run")


def add_common_flags(parser: argparse.ArgumentParser, progress: bool = True) -> None:
    """``--no-progress`` (where the command shows progress) and ``--debug``."""
    if progress:
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def flag_names(parser: argparse.ArgumentParser,
               aliases: Mapping[str, str] | None = None) -> dict[str, str]:
    """Python name of a setting -> its flag: each argument's destination by its long option,
    and ``aliases`` for settings that the library names otherwise (``num_steps`` for
    ``--ais-steps``)."""
    names = {}
    for action in parser._actions:
        long = [o for o in action.option_strings if o.startswith("--")]
        if long:
            names[action.dest] = long[0]
    return {**names, **(aliases or {})}


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None, *,
             parser: Callable[[], argparse.ArgumentParser] | None = None,
             aliases: Mapping[str, str] | None = None) -> int:
    """Run ``main``; a user error becomes one line on stderr and exit code 2 (``--debug``: raise).
    A setting the error names is named by its flag of ``parser`` (or ``aliases``)."""
    args = sys.argv[1:] if argv is None else argv
    configure_cpu()
    try:
        return main(args)
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    except ElbogapError as e:
        if "--debug" in args:
            traceback.print_exc()
        text = str(e)
        if isinstance(e, OptionError) and parser is not None:
            text = e.for_flags(flag_names(parser(), aliases))
        if on_first_rank():  # every rank meets the same error; one says it
            print(f"error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse's error (said already) or --help: a code, as from Python
        return e.code if isinstance(e.code, int) else 1
