"""Run directories: what ``scripts/fit.py`` writes, and everything needed to pick a run up again
from Python (``load_run``) with its data, its pair and its fitted parameters.  Diagnosing a run
is ``elbogap.runs.diagnose``'s.

A run directory holds ``config.json`` (how to rebuild data and pair), ``checkpoint.pt``,
``metrics.jsonl`` (one record per epoch), ``diagnostics.json`` and the figures.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager as ContextManager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pyro
import torch

from ..data.catalog import load_dataset
from ..data.dataset import Dataset
from ..foundations.atomic import write_json_atomic
from ..foundations.distributed import SINGLE, Distributed
from ..foundations.errors import ConfigError, ElbogapError, OptionError, check_positive
from ..foundations.parameter_scope import ParameterScope, scope_of
from ..foundations.program_data import as_program_data
from ..training.checkpoint import checkpoint_records, load_checkpoint
from ..training.fitting import CHECKPOINT, METRICS, FitResult, fit
from ..training.options import FitOptions
from ..training.plan import diagnosed_points, plan_evaluation
from .config_file import CONFIG, RUN_DEFAULTS, read_config
from .ownership import own, real_path, release
from .pairs import MODELS_LIKELIHOOD, Pair, build_pair, default_guide, exact_means, is_user_factory
from .recorded import read_final_summary, read_history
from .user_code import MODEL_DIGEST, consent_to_code, file_digest, is_file_spec


@dataclass
class Run:
    """A run directory's config, data, pair (parameters restored) and checkpoint state.

    The pair keeps its parameters in a param store of its own (``parameter_scope``): ``model``
    and ``guide`` run with it, whatever other runs are loaded beside it; code of one's own that
    reads Pyro's param store (``pyro.param("W")``, an optimizer step) runs in ``with
    run.parameters():``."""

    dir: Path
    config: dict
    data: Dataset
    pair: Pair
    state: dict | None = None

    @property
    def model(self):
        return self.pair.model

    @property
    def guide(self):
        return self.pair.guide

    @property
    def options(self) -> FitOptions:
        return FitOptions(**self.config["fit_options"])

    @property
    def split(self) -> str:
        """Where the pair is diagnosed: "test", or "train" for a guide with parameters per
        training point or with global latents (see ``elbogap.training.EvaluationPlan``)."""
        return self.config.get("evaluated_on", "test")

    def points(self, n: int | None = None) -> torch.Tensor:
        """The points the pair is diagnosed on (a fixed random subset of ``n`` of them)."""
        return diagnosed_points(self.data, self.split, n)

    @property
    def history(self) -> list[dict]:
        """The records of ``metrics.jsonl``, one per epoch."""
        return read_history(self.dir / METRICS)

    def __repr__(self) -> str:
        c = self.config
        epoch = f"epoch {self.state['epoch']} of " if self.state else "epochs: "
        return (f"Run('{self.dir}': data {c['data']}, model {c['model']}, guide {c['guide']}, "
                f"{epoch}{c['fit_options']['epochs']}, diagnosed on {self.split})")

    def parameters(self) -> ContextManager[ParameterScope]:
        """A block in which Pyro's global param store holds this run's parameters (and, after
        it, what it held before)."""
        return scope_of(self.model, self.guide).active()

    def release(self) -> None:
        """Give up this process's ownership of the run directory (``elbogap.runs.ownership``),
        which ``new_run`` and ``resumed_run`` take and ``final_summary`` gives up: other
        processes (scripts/evaluate.py, say) may then write into it."""
        release(self.dir)

    @property
    def summary(self) -> dict:
        """The run's final evaluation, as ``diagnostics.json`` holds it."""
        return read_final_summary(self.dir)


def load_run(run_dir: str | Path, *, trust_code: bool = False,
             trust_model_file: bool = False) -> Run:
    """The run in ``run_dir``: its config, data, model and guide with the checkpoint's
    parameters, and the checkpoint's state (optimizer, epoch, random streams).

    Every file is read as data.  A model that is not a registered name but code (a Python file
    ``/path/to/file.py:name``, or ``package.module:name``) runs only with your word,
    ``trust_code``, since a run directory may come from anyone; a file then only if it is the
    one the run was fitted with (its sha256 in the config), unless ``trust_model_file`` (which
    implies ``trust_code``), and loading says so in a line on stderr."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    config_path = run_dir / CONFIG
    digest = consent_to_code(config, config_path, trust_code=trust_code,
                             trust_model_file=trust_model_file)
    try:
        data = run_data(config)
        built = config if digest is None else {**config, MODEL_DIGEST: digest}
        run = Run(run_dir, config, data, _scoped_pair(built, data.data_dim))
        run.options.check(data.train.shape[0], config["processes"])
    except OptionError as e:
        raise ConfigError(f"{config_path}: {e.for_flags(_CONFIG_NAMES)}") from None
    except ElbogapError as e:
        raise ConfigError(f"{config_path}: {e}") from None
    # A guide with parameters per training point is rebuilt on the training set.
    run.state = load_checkpoint(run_dir / CHECKPOINT, run.model, run.guide, run.points(2))
    return run


# A setting of a loaded run is named by its key in config.json.
_CONFIG_NAMES = {f.name: f"fit_options.{f.name}" for f in fields(FitOptions)} | {
    "path": "data_dir"}


def _scoped_pair(config: dict, data_dim: int, new: bool = False) -> Pair:
    """The pair a config names, with a param store of its own: runs loaded side by side never
    share parameters, whatever their pairs name them (``foundations.parameter_scope``)."""
    scope = ParameterScope()
    with scope.active():
        pair = build_pair(config, data_dim, new=new)
    return pair.in_scope(scope)


def run_data(config: dict) -> Dataset:
    """The data set a config names, with its validation split when it has one."""
    data = load_dataset(config.get("data") or "digits", config.get("data_dir"),
                        config.get("binarize") or "dynamic")
    if config.get("val_fraction"):
        data = data.with_validation(config["val_fraction"])
    return data


def run_settings(values: Mapping[str, object]) -> dict:
    """The entries of ``values`` that are settings of a run (keys of ``RUN_DEFAULTS`` and
    fields of ``FitOptions``): what ``new_run`` takes of a namespace of parsed flags."""
    known = set(RUN_DEFAULTS) | {f.name for f in fields(FitOptions)}
    return {name: value for name, value in values.items() if name in known}


def run_config(data: Dataset, settings: dict) -> dict:
    """A new run's config: ``settings`` (keys of ``RUN_DEFAULTS`` and ``FitOptions``, None
    meaning "the default") completed with defaults that depend on the data: latent_dim 50
    (10 for data of < 400 values, 3 for synthetic), hidden_dims (400,) ((200,) for small data),
    the likelihood the data set suits, the model's own guide.  A user's factory
    (``path.py:name``, ``package.module:name``) keeps its own defaults: what was not given
    stays None (likelihood "the model's"), and its guide is recorded once the pair is built
    (``Pair.guide_name``)."""
    config = {**RUN_DEFAULTS, **{f.name: f.default for f in fields(FitOptions)}}
    config.update({k: v for k, v in settings.items() if v is not None})
    unknown = set(config) - set(RUN_DEFAULTS) - {f.name for f in fields(FitOptions)}
    if unknown:
        raise ConfigError(f"unknown run settings {sorted(unknown)}")
    if config["binarize"] != RUN_DEFAULTS["binarize"] and config["data"] != "mnist":
        raise OptionError("binarize", f"{{option}} {config['binarize']} is for data mnist (the "
                                      f"other data sets are read as they are), not "
                                      f"{config['data']}")
    if config["data"] != "mnist":
        # Only mnist is binarized; the others are read as they are, and their config says so.
        config["binarize"] = None
    model = config["model"]
    if is_user_factory(model):
        if config["likelihood"] == "auto":
            config["likelihood"] = MODELS_LIKELIHOOD
    else:
        small = data.data_dim < 400
        if config["likelihood"] == "auto":
            config["likelihood"] = data.likelihood
        if config["hidden_dims"] is None:
            config["hidden_dims"] = [200] if small else [400]
        if config["latent_dim"] is None:
            config["latent_dim"] = 3 if data.name == "synthetic" else 10 if small else 50
        config["guide"] = config["guide"] or default_guide(model)
    if config["hidden_dims"] is not None:
        config["hidden_dims"] = list(config["hidden_dims"])
    if is_file_spec(model):
        config["model"] = _resolved(model)
        if (file := Path(model.rpartition(":")[0])).is_file():
            # What loading the run later checks before it runs the file again.
            config[MODEL_DIGEST] = file_digest(file)
    if config["flows"] is not None and config["guide"] not in ("iaf", None):
        raise OptionError("flows", f"{{option}} is for the iaf guide, not {config['guide']!r}")
    if config["data_dir"] is not None:
        config["data_dir"] = _resolved(config["data_dir"])
    check_positive(**{name: config[name] for name in
                      ("num_samples", "test_points", "eval_batch_size")})
    return config


def _resolved(path: str) -> str:
    """A path as a config holds it: absolute (``path.py:name``: its file's path)."""
    if is_file_spec(path):
        file, _, name = path.rpartition(":")
        return f"{Path(file).resolve()}:{name}"
    return str(Path(path).resolve())


def changed_settings(run_dir: Path, settings: Mapping[str, object]) -> list[str]:
    """The names of ``settings`` (a run's settings, as ``run_settings`` takes them) whose value
    is not the one the run in ``run_dir`` holds, paths compared as its config writes them; none
    while it has no config.  A restart repeats the command that started the run (torchrun
    --max-restarts): settings that restate the run are no news, only those that would change it."""
    if not settings or not (run_dir / CONFIG).is_file():
        return []
    config = read_config(run_dir)
    held = {**config, **config["fit_options"]}
    changed = []
    for name, value in settings.items():
        if name == "data_dir" or name == "model" and is_file_spec(value):
            value = _resolved(value)
        elif name == "hidden_dims" and value is not None:
            value = list(value)
        if name not in held or held[name] != value:
            changed.append(name)
    return changed


def check_likelihood(likelihood: str, data: Dataset) -> None:
    if likelihood != "bernoulli":
        return
    # Dynamically binarized training data holds grey levels, drawn to 0/1 every epoch.
    for split in (data.test,) if data.dynamic_binarization else (data.train, data.test):
        values = as_program_data(split).flat_rows()
        if not ((values == 0) | (values == 1)).all():
            low, high = values.min().item(), values.max().item()
            raise OptionError(
                "likelihood",
                f"{{option}} bernoulli needs data of 0s and 1s, but data set '{data.name}' has "
                f"values from {low:g} to {high:g}: binarize it (for mnist: --binarize), or use "
                "{option} gaussian")


def prepare_run_dir(run_dir: Path, overwrite: bool = False) -> Path:
    """Make ``run_dir`` ready for a new run, owned by this process: refuse one that another
    process owns, or that holds a run (unless ``overwrite``: the old run is then moved aside
    whole, to ``replaced_run(run_dir)``, where it stays until the new run's first checkpoint is
    written), or that cannot be written.  An overwrite that was interrupted before its new run
    wrote a checkpoint is undone first: the old run comes back."""
    if run_dir.is_file():
        raise OptionError("out", f"{{option}} {run_dir}: is a file, not a directory")
    own(run_dir, "scripts/fit.py")
    real = real_path(run_dir)
    _settle_replacement(real, undo=True)
    held = visible_files(real)
    if held == {CONFIG}:
        # A run that failed before its first epoch (its config is all it wrote): nothing to keep.
        print(f"note: {run_dir} holds only the config of a run that never completed an epoch; "
              "starting anew there")
    elif held and not overwrite:
        raise OptionError(
            "out", f"{{option}} {run_dir}: already holds a run; pass overwrite=True (--overwrite) "
            "to replace it, or another {option}")
    elif held:
        _move_aside(real)
    try:
        real.mkdir(parents=True, exist_ok=True)
        # A name of its own, created anew: never a file planted there, nor a link's target.
        fd, probe = tempfile.mkstemp(dir=real, prefix=".write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OptionError("out", f"{{option}} {run_dir}: cannot write there ({e.strerror})") from None
    _remove_leftovers(real)
    return run_dir


def visible_files(run_dir: Path) -> set[str]:
    """What a run directory holds, without its hidden files (a write's temporary file)."""
    return ({p.name for p in run_dir.iterdir() if not p.name.startswith(".")}
            if run_dir.is_dir() else set())


def replaced_run(run_dir: str | Path) -> Path:
    """Where ``--overwrite`` keeps the run it replaces, whole, until the new run in ``run_dir``
    has written its first checkpoint: ``.NAME.replaced`` beside it."""
    real = real_path(run_dir)
    return real.parent / f".{real.name}.replaced"


def _move_aside(run_dir: Path) -> None:
    """Rename the old run away in one step: a kill at any moment leaves the old run whole,
    in ``run_dir`` or in ``replaced_run(run_dir)``, never its checkpoint under a new config."""
    try:
        os.rename(run_dir, replaced_run(run_dir))
    except OSError as e:
        raise OptionError("out", f"{{option}} {run_dir}: cannot move the old run aside "
                                 f"({e.strerror})") from None


def _settle_replacement(run_dir: Path, undo: bool) -> None:
    """Finish what an overwrite of ``run_dir`` left beside it (its owner holds it): once the
    new run has a checkpoint, the replaced run is gone for good; before, ``undo`` puts the
    replaced run back in place of the new run's first files."""
    aside = replaced_run(run_dir)
    if not aside.is_dir():
        return
    if (run_dir / CHECKPOINT).is_file():
        shutil.rmtree(aside, ignore_errors=True)
    elif undo:
        shutil.rmtree(run_dir, ignore_errors=True)
        try:
            os.rename(aside, run_dir)
        except OSError as e:
            raise ConfigError(f"{aside}: cannot put the run an --overwrite was replacing back "
                              f"in {run_dir} ({e.strerror}); it is whole there") from None
        print(f"note: {run_dir}: an --overwrite ended before its new run wrote a checkpoint; "
              "the run it was replacing is back in place", file=sys.stderr)


def _remove_leftovers(run_dir: Path) -> None:
    for leftover in run_dir.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)  # write_atomic's, of a write a kill cut short


def default_run_dir(config: dict) -> Path:
    return Path("runs") / (f"{config['data']}-{Path(config['model']).stem}-"
                           f"{time.strftime('%Y%m%d-%H%M%S')}")


def new_run(settings: dict, out: str | Path | None = None, overwrite: bool = False,
            distributed: Distributed = SINGLE) -> tuple[Run, FitOptions]:
    """A run not yet trained: data loaded, pair built (seeded by ``settings["seed"]``), every
    rule checked, and only then its directory made and ``config.json`` written."""
    # The same seed on every rank: the same initial parameters (fit varies the draws per rank).
    pyro.set_rng_seed(settings.get("seed") or 0)
    data = run_data(settings)
    config = run_config(data, settings)
    check_likelihood(config["likelihood"], data)
    pair = _scoped_pair(config, data.data_dim, new=True)
    config["guide"] = pair.guide_name
    options = FitOptions(**{f.name: config.pop(f.name) for f in fields(FitOptions)})
    options.check(data.train.shape[0], distributed.world_size)
    # Where the fitted pair can be diagnosed (a clear error now if the pair breaks a rule).
    config["evaluated_on"] = plan_evaluation(pair.model, pair.guide, data, options).split
    if config["evaluated_on"] == "test" and config["test_points"] is not None:
        held = len(as_program_data(data.test))
        if config["test_points"] > held:
            raise OptionError("test_points", f"{{option}} {config['test_points']}: data set "
                                             f"'{data.name}' has {held} test points")
    run_dir = Path(out) if out is not None else default_run_dir(config)
    run_dir = distributed.on_main(lambda: prepare_run_dir(run_dir, overwrite))
    config.update(fit_options=asdict(options), processes=distributed.world_size)
    if distributed.is_main:
        write_json_atomic(run_dir / CONFIG, config)
    return Run(run_dir, config, data, pair), options


def resumed_run(run_dir: str | Path, epochs: int | None = None,
                time_budget: float | None = None,
                distributed: Distributed = SINGLE, *, trust_code: bool = False,
                trust_model_file: bool = False) -> tuple[Run, FitOptions]:
    """The run in ``run_dir``, ready to continue from its checkpoint with its own settings
    (``epochs`` may raise the total, ``time_budget`` in seconds bounds this session).  What a
    crash leaves is repaired: a half record at the end of ``metrics.jsonl`` is dropped, the
    temporary files of writes cut short are removed."""
    if distributed.is_main:
        own(run_dir, "scripts/fit.py --resume")
    run = load_run(run_dir, trust_code=trust_code, trust_model_file=trust_model_file)
    options = run.options
    if epochs is not None:
        options.epochs = epochs
    if time_budget is not None:
        options.time_budget = time_budget
    options.check(run.data.train.shape[0], distributed.world_size)
    # The records that belong to the checkpoint (metrics.jsonl is written just before it:
    # one more is the epoch a kill cut short, redone now).
    records = checkpoint_records(run.state)
    history = read_history(run.dir / METRICS, drop_half_line=True)[:records]
    if len(history) < records:
        # The records steer training (learning-rate plateaus, early stopping, step counters):
        # without them the resumed run would not be the run it continues.
        raise ConfigError(
            f"{run.dir / METRICS}: holds the records of epochs 1 to {len(history)}, but the "
            f"checkpoint is of epoch {records}: the run cannot continue as it was; "
            "start a new one")
    run.state["history"] = history
    if distributed.is_main:
        _remove_leftovers(run.dir)
        _settle_replacement(real_path(run.dir), undo=False)
    return run, options


def continued_run(run_dir: str | Path, epochs: int | None = None,
                  time_budget: float | None = None, distributed: Distributed = SINGLE, *,
                  trust_code: bool = False, trust_model_file: bool = False,
                  overwrite: bool = False) -> tuple[Run, FitOptions] | None:
    """What ``--resume RUN_DIR`` continues: the run from its checkpoint (``resumed_run``); a
    run with a config but no checkpoint yet (killed before its first epoch ended) started
    again from its own settings, never defaults; None where ``run_dir`` holds no run (a first
    start of a command that restarts).  A directory that holds results but neither checkpoint
    nor config is refused, as is one with results and a config but no checkpoint (its
    checkpoint was lost), unless ``overwrite``."""
    run_dir = Path(run_dir)
    if distributed.is_main:
        # Owned before anything is read: no other process changes it meanwhile.
        own(run_dir, "scripts/fit.py --resume")
    if (run_dir / CHECKPOINT).is_file():
        run, options = resumed_run(run_dir, epochs, time_budget, distributed,
                                   trust_code=trust_code, trust_model_file=trust_model_file)
        distributed.say(f"resuming {run.dir} after epoch {run.state['epoch']} of "
                        f"{options.epochs}")
        return run, options
    held = visible_files(run_dir)
    if CONFIG not in held:
        if held:
            raise ConfigError(f"{run_dir}: holds {sorted(held)} but no {CONFIG}: not a run to "
                              "continue; start it elsewhere, or remove those files")
        return None
    if held - {CONFIG, METRICS} and not overwrite:
        raise ConfigError(
            f"{run_dir}: holds {sorted(held - {CONFIG, METRICS})} but no {CHECKPOINT} to "
            "continue from; pass --overwrite (overwrite=True) to start the run again from its "
            "own settings, or put the checkpoint back")
    config = read_config(run_dir)
    consent_to_code(config, run_dir / CONFIG, trust_code=trust_code,
                    trust_model_file=trust_model_file)
    settings = {**{k: config[k] for k in RUN_DEFAULTS}, **config["fit_options"]}
    settings.update({k: v for k, v in (("epochs", epochs), ("time_budget", time_budget))
                     if v is not None})
    distributed.say(f"no checkpoint in {run_dir} yet: starting the run again from its own "
                    "settings (config.json)")
    return new_run(settings, run_dir, overwrite=True, distributed=distributed)


def train(run: Run, options: FitOptions, distributed: Distributed = SINGLE) -> FitResult:
    """``fit`` the run's pair, checkpointing into its directory; the closed forms of a model
    that has them are recorded beside every epoch's diagnostics.  The run an ``--overwrite``
    replaced (``replaced_run``) is removed once the first checkpoint is written, and put back
    if training fails before."""
    eval_x = run.points(options.eval_points)

    def add_exact(record: dict) -> None:
        if "diagnostics" in record and (exact := exact_means(run.pair.exact(eval_x))) is not None:
            record["exact"] = exact

    def commit_replacement() -> None:
        # The new run has a checkpoint: the run an --overwrite replaced is gone for good.
        if distributed.is_main:
            _settle_replacement(real_path(run.dir), undo=False)

    try:
        return fit(run.model, run.guide, run.data, options, run.dir, on_epoch=add_exact,
                   distributed=distributed, resume=run.state, on_saved=commit_replacement)
    except BaseException:
        # An overwrite that fails before its new run has a checkpoint leaves the old run.
        if distributed.is_main:
            _settle_replacement(real_path(run.dir), undo=True)
        raise
