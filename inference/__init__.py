"""elbogap: variational inference on Pyro that reports how far the guide is from the posterior.

Nothing here knows a particular model: every quantity is read off Pyro traces.  What the
command-line scripts do is a call from Python::

    from elbogap import evaluate, fit, FitOptions, load_dataset, load_run, Report
    run = load_run("runs/digits-vae-...")       # config, data, model, guide, parameters
    d = evaluate(run.model, run.guide, run.data.test, num_samples=1000)
    d                                            # a table (an HTML table in Jupyter)
    d.plot_kl_per_dim()                          # a figure (in Jupyter, shown at once)

The package is layered, each layer importing only those below it (``lint-imports`` checks it):
``foundations`` (errors, traces, the pair's layout, PSIS and statistics, devices, processes,
files) -> ``data`` -> ``presentation`` (tables, figures, HTML) -> ``diagnostics`` (the
estimators and their results) -> ``training`` -> ``runs`` (run directories, diagnosing a run,
reports, comparisons) -> ``cli`` (the commands).  ``elbogap.models`` and ``elbogap.guides`` hold
this project's own pairs, which no layer imports.
"""

# First, before anything imports Pyro (whose MCMC logger imports tqdm.auto): tqdm's
# "IProgress not found" warning in a kernel without ipywidgets is left out (foundations.progress).
from .foundations import progress  # noqa: F401, I001
from .data.catalog import load_dataset
from .data.dataset import Dataset, subset
from .diagnostics.ais import AnnealedEvidence, annealed_evidence
from .diagnostics.amortization import GapDecomposition, decompose_gap
from .diagnostics.bdmc import BidirectionalBounds, bdmc
from .diagnostics.calibration import Calibration, calibration
from .diagnostics.vsbc import VSBC, vsbc
from .diagnostics.evaluation import evaluate
from .diagnostics.predictive import PosteriorPredictive, posterior_predictive
from .diagnostics.results import DataSetTotals, Diagnostics
from .diagnostics.surgery import ElboSurgery, elbo_surgery
from .foundations.cpu import configure_cpu
from .foundations.device import move_pair, resolve_device
from .foundations.errors import ConfigError, ConventionError, DataError, ElbogapError, OptionError
from .foundations.program_data import ProgramData
from .runs.compare import Comparison, compare
from .runs.diagnose import Diagnosis, diagnose, final_summary
from .runs.pairs import AUTOGUIDES, Pair, build_pair
from .runs.report import Report, ReportSettings
from .runs.run_directory import Run, load_run, new_run, resumed_run, train
from .training.fitting import FitResult, fit
from .training.options import FitOptions

__all__ = [
    "AUTOGUIDES",
    "AnnealedEvidence",
    "BidirectionalBounds",
    "Calibration",
    "Comparison",
    "ConfigError",
    "ConventionError",
    "DataError",
    "DataSetTotals",
    "Dataset",
    "Diagnosis",
    "Diagnostics",
    "ElboSurgery",
    "ElbogapError",
    "FitOptions",
    "FitResult",
    "GapDecomposition",
    "OptionError",
    "Pair",
    "PosteriorPredictive",
    "ProgramData",
    "VSBC",
    "Report",
    "ReportSettings",
    "Run",
    "annealed_evidence",
    "bdmc",
    "calibration",
    "build_pair",
    "compare",
    "configure_cpu",
    "decompose_gap",
    "diagnose",
    "elbo_surgery",
    "evaluate",
    "final_summary",
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
    "vsbc",
]
