"""The exceptions elbogap raises for problems a user can fix.

Every message names the file, argument or Pyro site at fault and what was expected, so that the
scripts can print it as one line instead of a traceback.
"""


class ElbogapError(Exception):
    """Base class: a problem with the user's input, not a bug in elbogap."""


class DataError(ElbogapError, ValueError):
    """A data file or array is missing, corrupt, or not of the expected shape or values."""


class ConventionError(ElbogapError, ValueError):
    """A model/guide pair does not follow the conventions the diagnostics rely on."""


class ConfigError(ElbogapError, ValueError):
    """A command-line argument or configuration value is out of range or inconsistent."""
