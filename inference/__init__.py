"""Fitting and diagnostics for any Pyro model/guide pair that follows elbogap's conventions.

Nothing here knows a particular model: every quantity is read off Pyro traces.  What the
command-line scripts do is a call from Python::

    from inference import evaluate, fit, FitOptions, load_dataset, load_run, Report
    run = load_run("runs/digits-vae-...")       # config, data, model, guide, parameters
    d = evaluate(run.model, run.guide, run.data.test, num_samples=1000)
    d                                            # a table (an HTML table in Jupyter)
    d.plot_kl_per_dim(); d.plot_khat()
"""

from inference.data.datasets import Dataset, load_dataset, subset
from inference.diagnostics.ais import AnnealedEvidence, BidirectionalBounds, annealed_evidence, bdmc
from inference.diagnostics.amortization import GapDecomposition, decompose_gap
from inference.diagnostics.evaluation import DataSetTotals, Diagnostics, evaluate
from inference.diagnostics.predictive import PosteriorPredictive, posterior_predictive
from inference.diagnostics.surgery import ElboSurgery, elbo_surgery
from inference.errors import ConfigError, ConventionError, DataError, ElbogapError
from inference.outputs.compare import Comparison, compare
from inference.outputs.report import Report, ReportSettings
from inference.outputs.runs import Run, load_run, new_run, resumed_run, train
from inference.pairs import AUTOGUIDES, Pair, build_pair
from inference.training.device import move_pair, resolve_device
from inference.training.fitting import FitOptions, FitResult, fit

__all__ = [
    "AUTOGUIDES",
    "AnnealedEvidence",
    "BidirectionalBounds",
    "Comparison",
    "ElboSurgery",
    "annealed_evidence",
    "bdmc",
    "elbo_surgery",
    "ConfigError",
    "ConventionError",
    "DataError",
    "DataSetTotals",
    "Dataset",
    "Diagnostics",
    "ElbogapError",
    "FitOptions",
    "FitResult",
    "GapDecomposition",
    "Pair",
    "PosteriorPredictive",
    "Report",
    "ReportSettings",
    "Run",
    "build_pair",
    "compare",
    "decompose_gap",
    "evaluate",
    "fit",
    "load_dataset",
    "load_run",
    "move_pair",
    "new_run",
    "posterior_predictive",
    "resolve_device",
    "resumed_run",
    "subset",
    "train",
]
