"""Fitting and diagnostics for any Pyro model/guide pair that follows elbogap's conventions.

Nothing here knows a particular model: every quantity is read off Pyro traces.
"""

from inference.diagnostics.evaluation import DataSetTotals, Diagnostics, evaluate
from inference.diagnostics.predictive import PosteriorPredictive, posterior_predictive
from inference.errors import ConfigError, ConventionError, DataError, ElbogapError

__all__ = [
    "ConfigError",
    "ConventionError",
    "DataError",
    "DataSetTotals",
    "Diagnostics",
    "ElbogapError",
    "PosteriorPredictive",
    "evaluate",
    "posterior_predictive",
]
