"""A run's ``config.json``: what ``scripts/fit.py`` writes there, and reading it back checked.

A run directory may come from someone else (a colleague's results, a paper's artifacts), edited
by hand or written by another version: every key is checked for presence and type before the
run is rebuilt from it, so that a damaged config is one line naming the file and the key, never
a ``KeyError`` halfway through loading.
"""

from __future__ import annotations

import json
import os
import types
import typing
from dataclasses import fields
from pathlib import Path

from ..data.catalog import DATASETS
from ..data.readers import BINARIZATIONS
from ..foundations.errors import ConfigError, OptionError, check_positive
from ..training.options import FitOptions
from .pairs import MODELS_LIKELIHOOD
from .recorded import read_json
from .user_code import MODEL_DIGEST

CONFIG = "config.json"
# Settings of a run besides FitOptions: data, pair and the final evaluation.
RUN_DEFAULTS = {"data": "digits", "data_dir": None, "binarize": "dynamic", "model": "vae",
                "guide": None, "likelihood": "auto", "likelihood_scale": None,
                "latent_dim": None, "hidden_dims": None, "num_samples": 1000,
                "test_points": None, "eval_batch_size": 100, "val_fraction": None,
                "flows": None}

# Every key of a written config and the type of its value: the settings, completed (no "auto",
# no None where a default applies), then what fit found and used.
CONFIG_KEYS: dict[str, object] = {
    "data": str, "data_dir": str | None, "binarize": str | None, "model": str, "guide": str,
    "likelihood": str, "likelihood_scale": float | None, "latent_dim": int | None,
    "hidden_dims": list[int] | None, "num_samples": int, "test_points": int | None,
    "eval_batch_size": int, "val_fraction": float | None, "flows": int | None,
    "evaluated_on": str, "processes": int, "fit_options": dict,
}
CHOICES = {"data": DATASETS, "binarize": BINARIZATIONS,
           "likelihood": ("bernoulli", "gaussian", MODELS_LIKELIHOOD),
           "evaluated_on": ("test", "train")}
POSITIVE = ("latent_dim", "num_samples", "test_points", "eval_batch_size", "flows", "processes")


def read_config(run_dir: str | Path) -> dict:
    """``run_dir``'s config, every key present with a value of its type; else a
    ``ConfigError`` naming the file and the key."""
    path = Path(run_dir) / CONFIG
    if not os.path.lexists(path):  # a link, a device: refused when read
        raise ConfigError(f"{run_dir}: no {CONFIG}; is it a run directory of scripts/fit.py?")
    config = read_json(path)
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object of a run's settings, got "
                          f"{_json_type(config)}")
    check_config(config, path)
    return config


def check_config(config: dict, path: Path | str = CONFIG) -> None:
    """Refuse a config with keys missing, unknown or of the wrong type (``path`` names it)."""
    options = {f.name: f for f in fields(FitOptions)}
    expected = dict(CONFIG_KEYS)
    # Configs written before fit_options held every setting repeated them at the top level.
    unknown = sorted(set(config) - set(expected) - {MODEL_DIGEST} - set(options))
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}: not settings of an elbogap run "
                          "(mistyped, or written by another version?)")
    missing = sorted(set(expected) - set(config))
    if missing:
        raise ConfigError(f"{path}: missing keys {missing} (a run's config holds "
                          f"{sorted(expected)})")
    for key, hint in expected.items():
        _check_value(path, key, config[key], hint)
    if MODEL_DIGEST in config:
        _check_value(path, MODEL_DIGEST, config[MODEL_DIGEST], str)
    hints = typing.get_type_hints(FitOptions)
    fit_options = config["fit_options"]
    unknown = sorted(set(fit_options) - set(options))
    missing = sorted(set(options) - set(fit_options))
    if unknown or missing:
        raise ConfigError(f"{path}: fit_options " + "; ".join(
            text for text in (f"has unknown keys {unknown}" if unknown else "",
                              f"lacks keys {missing}" if missing else "") if text)
            + " (its keys are the fields of FitOptions)")
    for key, value in fit_options.items():
        _check_value(path, f"fit_options.{key}", value, hints[key])


def _check_value(path: Path | str, key: str, value: object, hint: object) -> None:
    if not _matches(value, hint):
        raise ConfigError(f"{path}: {key} must be {_described(hint)}, got {json.dumps(value)}")
    if key in CHOICES and value not in CHOICES[key] and not (key == "binarize" and value is None):
        raise ConfigError(f"{path}: {key} must be one of {list(CHOICES[key])}, got "
                          f"{json.dumps(value)}")
    if key in POSITIVE:
        try:
            check_positive(**{key: value})
        except OptionError as e:
            raise ConfigError(f"{path}: {e}") from None


def _matches(value: object, hint: object) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is float:  # JSON writes 1.0 as 1.0, but a hand-edited 1 is the same number
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _described(hint: object) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_described(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_described(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    return {type(None): "null", int: "an integer", float: "a number", str: "a string",
            bool: "true or false", dict: "an object"}[hint]


def _json_type(value: object) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "true or false", type(None): "null"}.get(type(value), type(value).__name__)
