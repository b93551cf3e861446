"""What every command-line entry point shares: its help format, and elbogap's errors turned
into one line on stderr."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable

from inference.errors import ConfigError, ElbogapError
from inference.training.cpu import configure_cpu
from inference.training.fitting import TrainingInterrupted


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: not where the help already states it, not for switches (a
    store_false flag's default True reads as if the switch were on), not for None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default in (None, argparse.SUPPRESS)
                or isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)):
            return text
        return super()._get_help_string(action)


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
