"""What the command-line scripts share: building a model/guide pair, printing a summary table,
turning elbogap's errors into one-line messages."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from pyro.infer import autoguide

from guides import GUIDES
from inference.data.datasets import DATA_SEED, Dataset, load_dataset, subset_indices
from inference.diagnostics.reconstruction import reconstruct, sample_prior_means
from inference.errors import ConfigError, ElbogapError
from inference.outputs.plotting import (
    plot_elbo_curves,
    plot_evidence_gap,
    plot_image_grid,
    plot_kl_per_dim,
    plot_reconstructions,
    plot_terms_curves,
)
from inference.training.checkpoint import load_checkpoint
from inference.training.cpu import configure_cpu
from inference.training.fitting import CHECKPOINT, TrainingInterrupted, diagnosed_points
from inference.user_code import is_file_spec, load_object
from models import MODELS
from models.linear_gaussian import LinearGaussian


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


def _call_with_accepted(factory: Callable, **kwargs):
    """Call ``factory`` with the keyword arguments its signature accepts."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return factory(**kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return factory(**kwargs)
    return factory(**{k: v for k, v in kwargs.items() if k in params})


# Pyro's autoguides with a density, by the names --guide takes: built around any model.
AUTOGUIDES = {
    "auto-normal": autoguide.AutoNormal,
    "auto-diagonal-normal": autoguide.AutoDiagonalNormal,
    "auto-multivariate-normal": autoguide.AutoMultivariateNormal,
    "auto-lowrank-multivariate-normal": autoguide.AutoLowRankMultivariateNormal,
}


@dataclass
class Pair:
    """The model and guide callables, and for registered ones the objects that own them."""

    model: Callable
    guide: Callable
    model_object: object = None
    guide_object: object = None

    def exact(self, x: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Closed-form diagnostics, when the model has them and the guide exposes q's loc/scale."""
        if not (hasattr(self.model_object, "exact_diagnostics")
                and hasattr(self.guide_object, "encode")):
            return None
        with torch.no_grad():
            return self.model_object.exact_diagnostics(x, *self.guide_object.encode(x))


def exact_means(exact: dict[str, torch.Tensor] | None) -> dict[str, float] | None:
    """Means over data points of ``Pair.exact``'s closed forms (None stays None)."""
    return None if exact is None else {k: v.double().mean().item() for k, v in exact.items()}


# Synthetic data for --data synthetic: 1200 points from a fixed factor-analysis model.
SYNTHETIC_DIM, SYNTHETIC_LATENT, SYNTHETIC_TRAIN, SYNTHETIC_TEST = 10, 3, 1000, 200


def synthetic_truth() -> LinearGaussian:
    g = torch.Generator().manual_seed(DATA_SEED)
    return LinearGaussian.from_parameters(
        torch.randn(SYNTHETIC_DIM, SYNTHETIC_LATENT, generator=g),
        torch.randn(SYNTHETIC_DIM, generator=g),
        0.1 + 0.4 * torch.rand(SYNTHETIC_DIM, generator=g),
    )


def load_data(name: str, path: str | None, binarize: str) -> Dataset:
    """A data set by name; ``synthetic`` is drawn from ``synthetic_truth()`` (seed 0)."""
    if name != "synthetic":
        return load_dataset(name, path, binarize)
    x = synthetic_truth().sample(
        SYNTHETIC_TRAIN + SYNTHETIC_TEST, torch.Generator().manual_seed(DATA_SEED + 1)
    )
    return Dataset("synthetic", x[:SYNTHETIC_TRAIN], x[SYNTHETIC_TRAIN:], None, "gaussian")


def default_guide(model_spec: str) -> str:
    return getattr(MODELS.get(model_spec), "default_guide", "mean-field")


def build_pair(config: dict, data: Dataset) -> Pair:
    """The model and guide the config names, sized for ``data``."""
    kwargs = {
        "data_dim": data.data_dim,
        "latent_dim": config["latent_dim"],
        "hidden_dims": tuple(config["hidden_dims"]),
        "likelihood": config["likelihood"],
        "likelihood_scale": config.get("likelihood_scale"),
    }
    if kwargs["likelihood_scale"] is not None and not kwargs["likelihood_scale"] > 0:
        raise ConfigError(f"--likelihood-scale must be positive, got {kwargs['likelihood_scale']}")
    if config["latent_dim"] < 1:
        raise ConfigError(f"--latent-dim must be a positive integer, got {config['latent_dim']}")
    spec = config["model"]
    if is_file_spec(spec):
        factory = load_object(spec)
        if not callable(factory):
            raise ConfigError(f"--model {spec}: '{spec.rpartition(':')[2]}' is not callable")
        pair = _call_with_accepted(factory, **kwargs)
        if callable(pair) and not isinstance(pair, tuple):
            # A factory may return the model alone: the guide is then an autoguide.
            guide = config.get("guide") or "auto-normal"
            if guide not in AUTOGUIDES:
                raise ConfigError(f"--model {spec} returns a model alone: --guide must be one of "
                                  f"{sorted(AUTOGUIDES)}, got {guide!r}")
            return Pair(pair, AUTOGUIDES[guide](pair))
        if (
            not isinstance(pair, tuple)
            or len(pair) != 2
            or not all(callable(f) for f in pair)
        ):
            raise ConfigError(
                f"--model {spec}: must return a model, or a (model, guide) pair of callables, "
                f"got {type(pair).__name__}"
            )
        if config.get("guide") in AUTOGUIDES:
            return Pair(pair[0], AUTOGUIDES[config["guide"]](pair[0]))
        return Pair(*pair)
    if spec not in MODELS:
        raise ConfigError(
            f"--model {spec!r}: unknown; expected one of {sorted(MODELS)} or path/to/file.py:name"
        )
    if config["guide"] not in GUIDES and config["guide"] not in AUTOGUIDES:
        raise ConfigError(f"--guide {config['guide']!r}: unknown; expected one of "
                          f"{sorted(GUIDES) + sorted(AUTOGUIDES)}")
    try:
        model = _call_with_accepted(MODELS[spec], **kwargs)
        if config["guide"] in AUTOGUIDES:
            return Pair(model.model, AUTOGUIDES[config["guide"]](model.model), model)
        guide = _call_with_accepted(GUIDES[config["guide"]], **kwargs, model=model)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--model {spec} --guide {config['guide']}: {e}") from None
    return Pair(model.model, guide.guide, model, guide)


def _fmt(entry: dict | None) -> str:
    if entry is None:
        return ""
    se = entry.get("se")
    return f"{entry['mean']:12.3f}   ± {se:.3f}" if se is not None else f"{entry['mean']:12.3f}"


def _format_data_set(summary: dict) -> str:
    """The table of a pair whose unit is the data set (global latents): totals, Monte Carlo SE."""
    t, k = summary["total"], summary["num_samples"]

    def entry(key):
        return {"mean": t[key], "se": t.get(f"{key}_se")} if t[key] is not None else None

    rows = [("ELBO", entry("elbo")),
            ("  reconstruction  E_q[log p(x|z)]", entry("reconstruction")),
            ("  KL(q || p)  all latent variables", entry("kl_prior"))]
    rows += [(f"    site '{site}' ({e['method']})", e) for site, e in summary["kl_sites"].items()]
    rows += [(f"log p(x_1..N)  importance sampling, K={k}", entry("log_evidence")),
             ("evidence gap  log p(x_1..N) - ELBO", entry("evidence_gap"))]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'nats for the data set, N=' + str(summary['num_data']):<{width}}  "
             f"{'total':>12}   ± Monte Carlo SE"]
    lines += [f"{name:<{width}}  {_fmt(e)}" for name, e in rows]
    lines += [f"note: {n}" for n in summary.get("notes", [])]
    if summary.get("khat") is not None:
        lines.append(f"Pareto k-hat: {summary['khat']['verdict']}")
    lines.append(f"importance-sampling ESS: {summary['ess']['mean']:.1f} of K={k}")
    return "\n".join(lines)


def format_predictive(summary: dict) -> str:
    """One block for held-out points of a pair with global latents (no evidence gap there)."""
    entry = summary["log_density"]
    lines = [f"held-out points, N={summary['num_data']}: {summary['name']}, K={summary['num_samples']}",
             f"  mean per point {entry['mean']:.3f} ± {entry['se'] or float('nan'):.3f} "
             f"(sum {summary['total']:.3f})"]
    if "khat" in summary:
        lines.append(f"  Pareto k-hat: {summary['khat']['verdict']}")
    return "\n".join(lines)


def format_summary(summary: dict) -> str:
    """A table of the dataset means (± standard error over data points), in nats."""
    if summary.get("unit") == "data set":
        return _format_data_set(summary)
    k = summary["num_samples"]
    rows = [
        ("ELBO", summary["elbo"]),
        ("  reconstruction  E_q[log p(x|z)]", summary["reconstruction"]),
        ("  KL(q(z|x) || p(z))", summary["kl_prior"]),
    ]
    for site, entry in summary["kl_sites"].items():
        rows.append((f"    site '{site}' ({entry['method']})", entry))
    rows += [
        (f"log p(x)  importance sampling, K={k}", summary["log_evidence"]),
        ("evidence gap  log p(x) - ELBO", summary["evidence_gap"]),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'nats per data point, N=' + str(summary['num_data']):<{width}}  "
             f"{'mean':>12}   ± SE"]
    lines += [f"{name:<{width}}  {_fmt(entry)}" for name, entry in rows]
    for site, entry in summary["kl_sites"].items():
        if entry["method"] == "monte-carlo":
            lines.append(f"note: torch has no closed-form KL for site '{site}'; its KL is the "
                         "Monte Carlo mean of log q(z) - log p(z) over the K draws")
    mc = summary.get("log_evidence_mc_se")
    if mc is not None:
        lines.append(f"(Monte Carlo SE of log p(x) per data point, mean over points: {mc:.3f})")
    khat = summary.get("khat")
    if khat is not None:
        spread = (f"median {khat['median']:.2f}, max {khat['max']:.2f}; "
                  if khat["median"] is not None else "")
        lines.append(f"Pareto k-hat: {spread}{khat['verdict']}")
    if "ess" in summary:
        lines.append(f"importance-sampling ESS: mean {summary['ess']['mean']:.1f} of K={k} "
                     f"(min {summary['ess']['min']:.1f})")
    units = summary.get("active_units") or {}
    if units.get("total"):
        lines.append(f"active units (Cov_x E_q[z] > 0.01): {units['active']} of {units['total']}")
        if units["warning"]:
            lines.append(f"WARNING: {units['warning']}")
    lines += [f"note: {n}" for n in summary.get("notes", [])]
    return "\n".join(lines)


def read_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no config.json; is it a run directory of scripts/fit.py?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def load_run(run_dir: Path) -> tuple[dict, Dataset, Pair, dict]:
    """A run's config, its data, its model and guide with the checkpoint's parameters, and the
    checkpoint's state (optimizer, epoch, random streams)."""
    config = read_config(run_dir)
    pyro.clear_param_store()
    data = load_data(config["data"], config["data_dir"], config["binarize"])
    pair = build_pair(config, data)
    # A guide with parameters per training point is rebuilt on the training set.
    example = diagnosed_points(data, run_split(config), 2)
    state = load_checkpoint(run_dir / CHECKPOINT, pair.model, pair.guide, example)
    return config, data, pair, state


def run_split(config: dict) -> str:
    """The split a run's pair is diagnosed on (see inference.training.fitting.EvaluationPlan)."""
    return config.get("evaluated_on", "test")


def run_plate(args: argparse.Namespace, config: dict) -> str:
    """The data plate: the script's --data-plate, else the run's own."""
    return args.data_plate or config["fit_options"].get("data_plate", "data")




def run_figures(history: list[dict], kl_per_dim: dict, pair: Pair, data: Dataset,
                held_out: bool = True) -> dict:
    """The figures of a run by file name: curves over training, KL per dimension, and for image
    data reconstructions and prior samples read off the model's observed site."""
    figures = {
        "elbo.png": plot_elbo_curves(history),
        "reconstruction_kl.png": plot_terms_curves(history),
        "evidence_gap.png": plot_evidence_gap(history),
        "kl_per_dim.png": plot_kl_per_dim(kl_per_dim),
    }
    if data.image_shape is not None:
        # A guide with parameters per training point reconstructs only the training set.
        x = data.test if held_out else data.train
        shown = subset_indices(x.shape[0], 32)
        if held_out:
            x, shown = x[shown], torch.arange(len(shown))
        figures["reconstructions.png"] = plot_reconstructions(
            x[shown].numpy(), reconstruct(pair.model, pair.guide, x)[shown].numpy(),
            data.image_shape,
        )
        figures["prior_samples.png"] = plot_image_grid(
            sample_prior_means(pair.model, data.test[:64]).numpy(), data.image_shape,
            "prior samples: E[x|z], z ~ p(z)",
        )
    return figures


EXACT_ROWS = ("elbo", "reconstruction", "kl_prior", "log_evidence", "evidence_gap")


def format_exact_comparison(d, exact: dict[str, torch.Tensor]) -> str:
    """Estimated beside closed-form values; z = mean difference / its standard error."""
    lines = [f"{'closed form vs estimate, nats per point':<28}{'estimated':>12}{'exact':>12}"
             f"{'difference':>12}{'z':>7}"]
    for name in EXACT_ROWS:
        estimate = getattr(d, name).double()
        truth = exact[name].double()
        diff = estimate - truth
        se = diff.std().item() / len(diff) ** 0.5 if len(diff) > 1 else float("nan")
        z = diff.mean().item() / se if se > 0 else float("nan")
        lines.append(f"{name:<28}{estimate.mean().item():12.4f}{truth.mean().item():12.4f}"
                     f"{diff.mean().item():12.4f}{z:7.2f}")
    return "\n".join(lines)


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
