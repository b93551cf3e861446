"""What the command-line scripts share: building a model/guide pair, printing a summary table,
turning elbogap's errors into one-line messages."""

from __future__ import annotations

import inspect
import sys
import traceback
from collections.abc import Callable

from guides import GUIDES
from inference.datasets import Dataset
from inference.errors import ConfigError, ElbogapError
from inference.user_code import is_file_spec, load_object
from models import MODELS


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


def build_pair(config: dict, data: Dataset) -> tuple[Callable, Callable]:
    """The (model, guide) callables the config names, sized for ``data``."""
    kwargs = {
        "data_dim": data.data_dim,
        "latent_dim": config["latent_dim"],
        "hidden_dims": tuple(config["hidden_dims"]),
        "likelihood": config["likelihood"],
    }
    if config["latent_dim"] < 1:
        raise ConfigError(f"--latent-dim must be a positive integer, got {config['latent_dim']}")
    spec = config["model"]
    if is_file_spec(spec):
        factory = load_object(spec)
        if not callable(factory):
            raise ConfigError(f"--model {spec}: '{spec.rpartition(':')[2]}' is not callable")
        pair = _call_with_accepted(factory, **kwargs)
        if (
            not isinstance(pair, tuple)
            or len(pair) != 2
            or not all(callable(f) for f in pair)
        ):
            raise ConfigError(
                f"--model {spec}: must return a (model, guide) pair of callables, got "
                f"{type(pair).__name__}"
            )
        return pair
    if spec not in MODELS:
        raise ConfigError(
            f"--model {spec!r}: unknown; expected one of {sorted(MODELS)} or path/to/file.py:name"
        )
    if config["guide"] not in GUIDES:
        raise ConfigError(f"--guide {config['guide']!r}: unknown; expected one of {sorted(GUIDES)}")
    model = _call_with_accepted(MODELS[spec], **kwargs)
    guide = _call_with_accepted(GUIDES[config["guide"]], **kwargs)
    return model.model, guide.guide


def _fmt(entry: dict | None) -> str:
    if entry is None:
        return ""
    se = entry.get("se")
    return f"{entry['mean']:12.3f}   ± {se:.3f}" if se is not None else f"{entry['mean']:12.3f}"


def format_summary(summary: dict) -> str:
    """A table of the dataset means (± standard error over data points), in nats."""
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
    mc = summary.get("log_evidence_mc_se")
    if mc is not None:
        lines.append(f"(Monte Carlo SE of log p(x) per data point, mean over points: {mc:.3f})")
    return "\n".join(lines)


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main``; a user error becomes one line on stderr and exit code 2 (``--debug``: raise)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        return main(args)
    except ElbogapError as e:
        if "--debug" in args:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
