"""Fitting and diagnostics for any Pyro model/guide pair that follows elbogap's conventions.

Nothing here knows a particular model: every quantity is read off Pyro traces.
"""

from inference.diagnostics import Diagnostics, evaluate
from inference.errors import ConfigError, ConventionError, DataError, ElbogapError

__all__ = [
    "ConfigError",
    "ConventionError",
    "DataError",
    "Diagnostics",
    "ElbogapError",
    "evaluate",
]
