"""The exceptions elbogap raises for problems a user can fix.

Every message names the file, argument or Pyro site at fault and what was expected, so that the
command line can print it as one line instead of a traceback.  A setting is named as its caller
knows it: ``OptionError`` carries the setting's Python name (``num_samples``), which is what a
Python caller reads, and the command line reads it back under its flag (``--num-samples``).
"""

from __future__ import annotations

from collections.abc import Mapping

OPTION = "{option}"


class ElbogapError(Exception):
    """Base class: a problem with the user's input, not a bug in elbogap."""


class DataError(ElbogapError, ValueError):
    """A data file or array is missing, corrupt, or not of the expected shape or values."""


class ConventionError(ElbogapError, ValueError):
    """A model/guide pair does not follow the conventions the diagnostics rely on."""


class ConfigError(ElbogapError, ValueError):
    """An argument or configuration value is out of range or inconsistent."""


class OptionError(ConfigError):
    """A setting (a field of ``FitOptions``, an argument of ``evaluate``, a run's config key) with
    a value it cannot take.  ``message`` writes ``{option}`` where the setting is named: the
    Python name in ``str(error)``, the flag on the command line (``for_flags``)."""

    def __init__(self, option: str, message: str):
        self.option = option
        self.template = message if OPTION in message else f"{OPTION} {message}"
        super().__init__(self.template.replace(OPTION, option))

    def for_flags(self, flags: Mapping[str, str]) -> str:
        """The message with the setting named by its flag (``flags``: Python name -> flag)."""
        return self.template.replace(OPTION, flags.get(self.option, self.option))


class DataOptionError(OptionError, DataError):
    """A setting of how data are read or split (``val_fraction``, say) with a wrong value."""


# The most of anything a setting counts (draws, points, epochs, steps): torch's sizes and
# indices are int32 in places, and a count beyond it could not finish anyway.
MAX_COUNT = 2**31 - 1


def check_positive(**values: int | None) -> None:
    """Refuse a setting that is not an integer from 1 to ``MAX_COUNT``; None is "not given"."""
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise OptionError(name, f"must be a positive integer, got {value}")
        if value is not None and value > MAX_COUNT:
            raise OptionError(name, f"must be at most {MAX_COUNT} (2^31 - 1), got {value}: "
                                    "a count that large could not finish")
