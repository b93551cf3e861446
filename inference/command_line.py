"""What every command-line entry point shares: its help format, and elbogap's errors turned
into one line on stderr."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable

from inference.errors import ConfigError, ElbogapError
from inference.training.cpu import configure_cpu
from inference.training.elbo_step import ELBOS
from inference.training.fitting import FitOptions, TrainingInterrupted
from inference.training.schedule import LR_SCHEDULES


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: not where the help already states it, not for switches (a
    store_false flag's default True reads as if the switch were on), not for None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default in (None, argparse.SUPPRESS)
                or isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)):
            return text
        return super()._get_help_string(action)


def add_training_controls(parser: argparse.ArgumentParser, o: FitOptions) -> None:
    """The flags of ``FitOptions``' objective (``--elbo`` and its settings, the KL weight of
    ``inference.training.kl_weight``) and training controls (``inference.training.schedule``,
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


def parse_hidden_dims(text: str) -> tuple[int, ...]:
    """``"400"`` or ``"400,200"``; an empty string means no hidden layer."""
    try:
        dims = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"--hidden-dims {text!r}: expected comma-separated integers") from None
    if any(d < 1 for d in dims):
        raise ConfigError(f"--hidden-dims {text!r}: sizes must be positive")
    return dims


def check_positive(**flags: int | None) -> None:
    """Refuse a flag (given by its argparse dest) that is not an integer of at least 1; None is
    "not given"."""
    for name, value in flags.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main``; a user error becomes one line on stderr and exit code 2 (``--debug``: raise)."""
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
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
