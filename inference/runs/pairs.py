"""Building the model/guide pair a run's config names: registered names, a user's file, an
importable ``package.module:name``, and Pyro's autoguides around any model.

Names are looked up in the ``elbogap.models`` and ``elbogap.guides`` entry-point groups: each
entry is a mapping of names to factories (this project's pyproject.toml registers
``elbogap.models:MODELS`` and ``elbogap.guides:GUIDES``; a user's package registers its own the
same way), so that no layer of elbogap imports a particular model.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import cache
from importlib.metadata import entry_points

import torch
from pyro.infer import autoguide

from ..foundations.errors import ConfigError, OptionError
from ..foundations.parameter_scope import ParameterScope, scoped
from .user_code import MODEL_DIGEST, is_file_spec, is_module_spec, load_object

MODEL_GROUP, GUIDE_GROUP = "elbogap.models", "elbogap.guides"

# Pyro's autoguides with a density, by the names --guide takes: built around any model.
AUTOGUIDES = {
    "auto-normal": autoguide.AutoNormal,
    "auto-diagonal-normal": autoguide.AutoDiagonalNormal,
    "auto-multivariate-normal": autoguide.AutoMultivariateNormal,
    "auto-lowrank-multivariate-normal": autoguide.AutoLowRankMultivariateNormal,
}


@cache
def registered(group: str) -> Mapping[str, Callable]:
    """Every factory registered under ``group``, by name."""
    found: dict[str, Callable] = {}
    for entry in entry_points(group=group):
        mapping = entry.load()
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"entry point {entry.name} = {entry.value} in group {group}: "
                              f"expected a mapping of names to factories, got {type(mapping).__name__}")
        found.update(mapping)
    return found


def registered_models() -> Mapping[str, Callable]:
    return registered(MODEL_GROUP)


def registered_guides() -> Mapping[str, Callable]:
    return registered(GUIDE_GROUP)


@dataclass
class Pair:
    """The model and guide callables, and for registered ones the objects that own them;
    ``guide_name`` is what a run's config records: a registered guide's or autoguide's name,
    or FACTORY_GUIDE."""

    model: Callable
    guide: Callable
    model_object: object = None
    guide_object: object = None
    guide_name: str = ""

    def in_scope(self, scope: ParameterScope) -> Pair:
        """The pair with model and guide run on ``scope``'s parameters."""
        return replace(self, model=scoped(self.model, scope), guide=scoped(self.guide, scope))

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


EXACT_ROWS = ("elbo", "reconstruction", "kl_prior", "log_evidence", "evidence_gap")


def exact_comparison(d, exact: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per quantity of a Diagnostics ``d``: its mean estimate, the closed form's, their mean
    difference and z = difference / its standard error over points."""
    out = {}
    for name in EXACT_ROWS:
        estimate, truth = getattr(d, name).double(), exact[name].double()
        diff = estimate - truth
        se = diff.std().item() / len(diff) ** 0.5 if len(diff) > 1 else float("nan")
        out[name] = {"estimated": estimate.mean().item(), "exact": truth.mean().item(),
                     "difference": diff.mean().item(),
                     "z": diff.mean().item() / se if se > 0 else None}
    return out


def default_guide(model_spec: str) -> str:
    return getattr(registered_models().get(model_spec), "default_guide", "mean-field")


# The guide of a pair a user's factory returns, and a likelihood left to the model, as a run's
# config names them.
FACTORY_GUIDE = "the factory's"
MODELS_LIKELIHOOD = "the model's"


# The settings a user's factory is called with where they are given.
USER_SETTINGS = ("latent_dim", "hidden_dims", "likelihood", "likelihood_scale", "flows")


def is_user_factory(spec: str) -> bool:
    """Whether a model spec names a user's factory (a file's or a module's) rather than a
    registered model."""
    return is_file_spec(spec) or is_module_spec(spec)


def _named_parameters(factory: Callable) -> Mapping[str, inspect.Parameter] | None:
    """The parameters a factory takes by name; None where any name goes (``**kwargs``) or its
    signature cannot be read."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return params


def _call_with_accepted(factory: Callable, params: Mapping | None = None, **kwargs):
    """Call ``factory`` with the keyword arguments its signature accepts (``params``, its
    ``_named_parameters`` where the caller read them already)."""
    params = _named_parameters(factory) if params is None else params
    return factory(**kwargs if params is None else
                   {k: v for k, v in kwargs.items() if k in params})


def _load_factory(spec: str, digest: str | None = None) -> Callable:
    """The factory ``spec`` names; a file's only if its bytes have the sha256 ``digest``."""
    if is_file_spec(spec):
        factory = load_object(spec, digest)
    else:
        module, _, name = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise OptionError("model", f"{{option}} {spec}: cannot import it ({e})") from None
    if not callable(factory):
        raise OptionError("model", f"{{option}} {spec}: '{spec.rpartition(':')[2]}' is not "
                                   "callable")
    return factory


def _user_pair(spec: str, guide: str | None, given: dict, new: bool,
               digest: str | None) -> Pair:
    """The pair a user's factory returns, called with ``data_dim`` where it takes it and with
    the settings that were ``given`` (never this project's defaults, which would override the
    factory's own).  For a ``new`` run, a given setting the factory does not take, or a guide
    that is not an autoguide, is refused rather than dropped (configs written before this rule
    recorded such settings: they load as they were fitted, without them)."""
    factory = _load_factory(spec, digest)
    name = spec.rpartition(":")[2]
    params = _named_parameters(factory)
    if new and params is not None:
        for setting in given:
            if setting != "data_dim" and setting not in params:
                raise OptionError(setting, f"{{option}}: {name} in {spec.rpartition(':')[0]} "
                                           f"takes no {setting} (it takes "
                                           f"{', '.join(params) or 'no arguments'})")
        for setting, p in params.items():
            if setting in USER_SETTINGS and setting not in given and p.default is p.empty:
                raise OptionError(setting, f"{{option}} is needed: {name} in "
                                           f"{spec.rpartition(':')[0]} takes {setting} without "
                                           "a default")
    try:
        pair = _call_with_accepted(factory, params, **given)
    except Exception as e:  # the user's code: its failure is theirs, said in one line
        raise ConfigError(f"model {spec}: {name}(...) raised {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                          ) from None
    if new and guide is not None and guide != FACTORY_GUIDE and guide not in AUTOGUIDES:
        raise OptionError("guide", f"{{option}} {guide!r}: a model of one's own takes its guide "
                                   f"from its factory, or one of {sorted(AUTOGUIDES)}")
    if callable(pair) and not isinstance(pair, tuple):
        # A factory may return the model alone: the guide is then an autoguide.
        guide = guide if guide in AUTOGUIDES else "auto-normal"
        return Pair(pair, AUTOGUIDES[guide](pair), guide_name=guide)
    if not isinstance(pair, tuple) or len(pair) != 2 or not all(callable(f) for f in pair):
        raise OptionError("model", f"{{option}} {spec}: must return a model, or a (model, "
                                   f"guide) pair of callables, got {type(pair).__name__}")
    if guide in AUTOGUIDES:
        return Pair(pair[0], AUTOGUIDES[guide](pair[0]), guide_name=guide)
    return Pair(*pair, guide_name=FACTORY_GUIDE)


def build_pair(config: dict, data_dim: int, *, new: bool = False) -> Pair:
    """The model and guide ``config`` names (``model``, ``guide``, ``latent_dim``,
    ``hidden_dims``, ``likelihood``, ``likelihood_scale``, ``flows``), sized for data of
    ``data_dim``; registered factories get the keyword arguments their signatures accept, a
    user's factory ``data_dim`` and the settings given (not None), checked against its
    signature for a ``new`` run.  A model file is run only if its bytes have the sha256
    ``config["model_sha256"]`` where the config holds one: a run's config is first held to
    ``user_code.consent_to_code``."""
    spec, guide_name = config["model"], config.get("guide")
    if is_user_factory(spec):
        given = {k: config.get(k) for k in USER_SETTINGS}
        given = {k: tuple(v) if k == "hidden_dims" else v for k, v in given.items()
                 if v is not None and v != MODELS_LIKELIHOOD}
        _check_sizes(given)
        return _user_pair(spec, guide_name, {"data_dim": data_dim, **given}, new,
                          config.get(MODEL_DIGEST))
    kwargs = {
        "data_dim": data_dim,
        "latent_dim": config["latent_dim"],
        "hidden_dims": tuple(config["hidden_dims"]),
        "likelihood": config["likelihood"],
        "likelihood_scale": config.get("likelihood_scale"),
    }
    if config.get("flows") is not None:
        kwargs["flows"] = config["flows"]
    _check_sizes(kwargs)
    models, guides = registered_models(), registered_guides()
    if spec not in models:
        raise OptionError("model", f"{{option}} {spec!r}: unknown; expected one of "
                                   f"{sorted(models)}, path/to/file.py:name or "
                                   "package.module:name")
    if guide_name not in guides and guide_name not in AUTOGUIDES:
        raise OptionError("guide", f"{{option}} {guide_name!r}: unknown; expected one of "
                                   f"{sorted(guides) + sorted(AUTOGUIDES)}")
    try:
        model = _call_with_accepted(models[spec], **kwargs)
        if guide_name in AUTOGUIDES:
            return Pair(model.model, AUTOGUIDES[guide_name](model.model), model,
                        guide_name=guide_name)
        guide = _call_with_accepted(guides[guide_name], **kwargs, model=model)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model {spec!r} with guide {guide_name!r}: {e}") from None
    return Pair(model.model, guide.guide, model, guide, guide_name)


def _check_sizes(settings: dict) -> None:
    scale, latent = settings.get("likelihood_scale"), settings.get("latent_dim")
    if scale is not None and not 0 < scale < math.inf:
        raise OptionError("likelihood_scale", f"must be a positive number, got {scale}")
    if latent is not None and latent < 1:
        raise OptionError("latent_dim", f"must be a positive integer, got {latent}")
