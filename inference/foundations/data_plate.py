"""The data plate found, not named: which plate indexes data points, and which of the program's
arguments hold one row per point.

A Pyro program is called as ``model(*args, **kwargs)``.  Its data plate is the plate that holds
its observed sites and indexes the leading dimension of some tensor argument (by its size, or by
the full size it subsamples from): those tensors are sliced batch by batch, the other arguments
passed whole.  With one such plate it is used; with several, the caller names one
(``data_plate=``); with none (a model that observes its data as one whole, a GP module that holds
its own data and takes no argument) the unit of the diagnostics is the whole data set.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pyro
import torch
from pyro.poutine.trace_struct import Trace

from .conventions import traced
from .data_checks import (
    argument_names,
    check_finite,
    check_observed_rows,
    check_observed_support,
    check_row_counts,
)
from .enumeration import enumerating, marked_for_enumeration
from .errors import ConfigError, ConventionError
from .full_plates import full_plates, observations_cut, widened
from .module_mode import evaluation_mode
from .parameter_scope import in_scope_of
from .program_data import ProgramData, bound_program
from .rng import rng_preserved
from .traces import PARTICLE_PLATE, sample_sites


@dataclass(frozen=True)
class Program:
    """A model/guide pair bound to its arguments: what every diagnostic runs on.  ``model`` and
    ``guide`` take the one argument ``data``; ``data_plate`` indexes its batched rows."""

    model: Callable
    guide: Callable
    data: ProgramData
    data_plate: str | None


@dataclass(frozen=True)
class _Plate:
    name: str
    size: int
    full_size: int
    observes: tuple[str, ...]


def program_pair(model: Callable, guide: Callable | None, args: tuple, kwargs: dict[str, Any],
                 data_plate: str | None = None, widen: bool = False,
                 check_support: bool = True) -> Program:
    """The pair and its arguments as a ``Program``: the data plate found (or the one named
    checked) and the arguments it batches marked.  ``args`` may be one ``ProgramData`` (a
    diagnostic calling another); a ``Program``'s own model and guide are taken as they are.
    Without a guide the model's own draws are read (``guide`` is then None).  With ``widen``
    (every diagnostic) the pair runs with its subsampling plates at their full size
    (``full_plates``), checked on a trace, or is refused saying why it cannot.  The data are
    checked first (``data_checks``: non-finite values, row counts, every observed value in its
    site's support; ``check_support=False`` for grey levels binarized afresh every epoch)."""
    if len(args) == 1 and not kwargs and isinstance(args[0], ProgramData):
        data = args[0]
    else:
        data = ProgramData(tuple(args), dict(kwargs))
    model, guide = bound_program(model), None if guide is None else bound_program(guide)
    if not (data.located and data_plate in (None, data.plate)):
        # The data first: a NaN or mismatched rows is the data's fault, and said so.
        names = argument_names(model, data)
        check_finite(data, names)
        with rng_preserved(), torch.no_grad(), pyro.validation_enabled(False):
            try:
                guide_trace, model_trace = traced(model, guide, data)
            except ConventionError as e:
                check_row_counts(data, names, e)
                raise
        plate, rows = find_data_plate(model_trace, data, data_plate)
        check_observed_rows(model_trace, data, names, rows, plate)
        if check_support:
            check_observed_support(model_trace, data, names, plate)
        data = replace(data.with_rows(rows), plate=plate, located=True,
                       enum_dim=_enumeration_dim(guide_trace, model_trace))
    if widen and not getattr(model, "widens", False):
        model, guide, data = _widened_pair(model, guide, data)
    if data.enum_dim is not None and not getattr(model, "enumerates", False):
        model = enumerating(model, data.enum_dim)
    return Program(model, guide, data, data.plate)


def _widened_pair(model: Callable, guide: Callable | None, data: ProgramData
                  ) -> tuple[Callable, Callable | None, ProgramData]:
    """The pair with its subsampling plates widened (as it is where it has none), after one
    trace at full size: the run must succeed and every observed site of a widened plate must
    hold all N values along it.  A data plate declared over the whole data set and handed
    minibatches (``pyro.plate("data", N, len(x))``) is kept: it scores the rows it is given."""
    kept: frozenset[str] = frozenset()
    for _ in range(2):
        # In evaluation mode: a BatchNorm in training mode would update its statistics.
        with rng_preserved(), torch.no_grad(), pyro.validation_enabled(False), \
                evaluation_mode(model, guide), full_plates(kept) as widening:
            try:
                model_trace = traced(model, guide, data)[1]
                failure = None
            except ConventionError as e:
                model_trace, failure = None, e
        handed = widening.widened.get(data.plate)
        if handed is None or handed[0] == data.rows or handed[1] != data.rows or kept:
            break
        kept = frozenset({data.plate})
    if not widening.widened:
        if failure is not None:
            raise failure
        return model, guide, data
    plates = ", ".join(f"'{name}' ({m} of {n})" for name, (n, m) in widening.widened.items())
    reason = (str(failure) if failure is not None
              else observations_cut(model_trace, widening.widened))
    if reason is not None:
        raise ConventionError(
            f"plate(s) {plates} subsample: the diagnostics run a program with its plates at "
            f"their full size (a random subsample is no one data set's density), and this one "
            f"cannot: {reason}")
    return (widened(model, kept), None if guide is None else widened(guide, kept),
            replace(data, widened=tuple((name, n, m)
                                        for name, (n, m) in widening.widened.items())))


def _enumeration_dim(guide_trace: Trace | None, model_trace: Trace) -> int | None:
    """Where a model that enumerates discrete sites the guide does not sample lays them out:
    left of every plate of model and guide and of the particle plate (None: it enumerates
    none)."""
    guided = guide_trace.nodes if guide_trace is not None else {}
    if not any(s["type"] == "sample" and not s["is_observed"] and n not in guided
               and marked_for_enumeration(s) for n, s in model_trace.nodes.items()):
        return None
    nesting = max([-f.dim for t in (guide_trace, model_trace) if t is not None
                   for s in t.nodes.values() if s["type"] == "sample"
                   for f in s["cond_indep_stack"] if f.vectorized], default=0)
    return -(nesting + 2)


def find_data_plate(model_trace: Trace, data: ProgramData, data_plate: str | None = None
                    ) -> tuple[str | None, int | None]:
    """The data plate of a trace of the model on ``data`` and the rows it indexes (None, None:
    there is none, the data are one observation).  Raises ConventionError naming the candidates
    where several plates could be it, or why the one named cannot."""
    plates = _observing_plates(model_trace)
    sizes = data.leading_sizes()
    if data_plate is not None:
        plate = plates.get(data_plate)
        if plate is None:
            raise ConventionError(
                f"data_plate={data_plate!r}: no observed site of the model sits in a plate of that "
                f"name; the plates around its observed sites are {sorted(plates) or 'none'}"
            )
        rows = _rows(plate, sizes)
        if rows is None:
            raise ConventionError(
                f"data_plate={data_plate!r} has size {plate.size} but no tensor argument has "
                f"that many rows (their leading sizes: {_shown(sizes, data)}): the data plate "
                "must index the first dimension of the arguments that hold one row per point"
            )
        return data_plate, rows
    candidates = {name: p for name, p in plates.items() if _rows(p, sizes) is not None}
    if len(candidates) > 1:
        listed = "; ".join(f"'{p.name}' (size {p.size}, around {list(p.observes)})"
                           for p in candidates.values())
        raise ConventionError(
            f"several plates could index the data points: {listed}; each indexes the first "
            f"dimension of a tensor argument ({_shown(sizes, data)}): pass data_plate=... "
            "(--data-plate on the command line) naming the one over data points"
        )
    if not candidates:
        for p in plates.values():
            if p.full_size != p.size:
                # Which observations it scores would be drawn anew on every call.
                raise ConventionError(
                    f"plate '{p.name}' declares {p.full_size} points and subsamples {p.size}, "
                    f"but {_rows_said(sizes, data)}: a subsampling plate must index the "
                    f"arguments' rows (pyro.plate('{p.name}', len(x), subsample_size=B)) or be "
                    f"handed minibatches of them (pyro.plate('{p.name}', N, len(x)))"
                )
        return None, None
    (plate,) = candidates.values()
    return plate.name, _rows(plate, sizes)


def _rows(plate: _Plate, sizes: dict[int, list]) -> int | None:
    """The rows of the arguments ``plate`` indexes: its size, or the size it subsamples from
    (``pyro.plate("data", len(x), subsample_size=B)``)."""
    for size in (plate.size, plate.full_size):
        if size in sizes:
            return size
    return None


def _names(keys: list) -> str:
    return "/".join(f"args[{k}]" if isinstance(k, int) else k for k in keys)


def _rows_said(sizes: dict[int, list], data: ProgramData) -> str:
    if len(data.args) == 1 and not data.kwargs and sizes:
        return f"x has {next(iter(sizes))} rows"
    return f"the arguments' leading sizes are {_shown(sizes, data) or 'none'}"


def _shown(sizes: dict[int, list], data: ProgramData) -> str:
    return ", ".join(f"{_names(keys)}: {size}" for size, keys in sizes.items())


def _observing_plates(model_trace: Trace) -> dict[str, _Plate]:
    """The vectorized plates around the model's observed sites, by name."""
    plates: dict[str, _Plate] = {}
    for name, site in sample_sites(model_trace).items():
        if not site["is_observed"]:
            continue
        for frame in site["cond_indep_stack"]:
            if not frame.vectorized or frame.name == PARTICLE_PLATE:
                continue
            seen = plates.get(frame.name)
            size = frame.size if frame.size not in (None, -1) else _extent(site, frame.dim)
            full = frame.full_size if frame.full_size is not None else size
            plates[frame.name] = _Plate(frame.name, size, full,
                                        (seen.observes if seen else ()) + (name,))
    return plates


def takes_program_arguments(fn: Callable) -> Callable:
    """``fn(model[, guide], data, *, data_plate, **options)`` called the way Pyro's ELBOs are,
    ``(model, guide, *args, **kwargs)``: the keywords that are ``fn``'s options go to ``fn``,
    the others, and every positional argument, to the program.  A keyword that is both an option
    and a parameter of the model is refused as ambiguous (pass ``ProgramData.of(...)`` then)."""
    signature = inspect.signature(fn)
    positional = [p for p in signature.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    programs = positional[:-1]  # the model (and guide) before the data
    options = {n for n, p in signature.parameters.items() if p.kind is p.KEYWORD_ONLY}

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any):
        if len(args) < len(programs):
            raise TypeError(f"{fn.__name__} takes {', '.join(p.name for p in programs)} first")
        pair, args = args[: len(programs)], args[len(programs):]
        clash = sorted(set(kwargs) & options & _parameters(pair[0]))
        if clash:
            raise ConfigError(
                f"{fn.__name__}: keyword(s) {clash} are both options of {fn.__name__} and "
                "arguments of the model; pass the model's arguments as one "
                "ProgramData.of(*args, **kwargs)"
            )
        own = {k: v for k, v in kwargs.items() if k in options}
        empty = [k for k, v in ProgramData(args, kwargs).tensors() if v.dim() and not len(v)]
        if empty:
            raise ConfigError(f"{fn.__name__} got an empty data set "
                              f"({_names(empty)} has 0 rows)")
        # A loaded run's pair is diagnosed on its own parameters (``parameter_scope``).
        with in_scope_of(*pair):
            program = program_pair(pair[0], pair[1] if len(pair) > 1 else None, args,
                                   {k: v for k, v in kwargs.items() if k not in options},
                                   own.pop("data_plate", None), widen=True)
            if "data_plate" in options:
                own["data_plate"] = program.data_plate
            bound_pair = (program.model, program.guide)[: len(pair)]
            return fn(*bound_pair, program.data, **own)

    call.__signature__ = signature.replace(parameters=[
        *programs, inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
        *(p for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY),
        inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])
    return call


def _parameters(fn: Callable) -> set[str]:
    """The parameter names of a program (empty where they cannot be read)."""
    try:
        return set(inspect.signature(getattr(fn, "program", fn)).parameters)
    except (TypeError, ValueError):
        return set()


def _extent(site: dict, dim: int) -> int:
    """How many rows a plate written without a size (``pyro.plate("data", dim=-1)``, which
    broadcasts) spans at an observed site: the extent of the site's value along its dimension."""
    value = site["value"]
    if not torch.is_tensor(value):
        return 1
    position = value.dim() - site["fn"].event_dim + dim
    return value.shape[position] if 0 <= position < value.dim() else 1
