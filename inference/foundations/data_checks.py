"""The data checked against the model before anything runs on it.

Each check names the argument (by the model's own parameter name where it has one) and the row
at fault, in one line: a NaN or an infinite value in an argument, arguments whose row counts
disagree, a value outside the support of the distribution that observes it.  The support is
checked on every row of the data handed in (the trace that finds the data plate runs on all of
them), not on a first minibatch: Pyro's validation sees only the rows of each step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from pyro.poutine.trace_struct import Trace

from .errors import DataError
from .program_data import ProgramData
from .traces import data_frame, sample_sites


def argument_names(program: Callable, data: ProgramData) -> dict:
    """Key of each argument in ``data`` -> how the user knows it: the model's parameter name
    for a positional argument (``x``), else ``args[i]``; keywords by their own name."""
    try:
        params = [p.name for p in inspect.signature(getattr(program, "program", program))
                  .parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return {key: (f"argument '{params[key]}'" if isinstance(key, int) and key < len(params)
                  else f"argument args[{key}]" if isinstance(key, int) else f"argument '{key}'")
            for key, _ in data.items()}


def check_finite(data: ProgramData, names: dict) -> None:
    """Refuse NaN or infinite values in a floating-point argument, naming it and the row."""
    for key, value in data.tensors():
        if not value.is_floating_point():
            continue
        bad = ~torch.isfinite(value)
        if bad.any():
            where = _position(bad)
            kind = "NaN" if torch.isnan(value[tuple(where)]) else "an infinite value"
            total = int(bad.sum())
            raise DataError(f"{names.get(key, key)}: {kind} at {_said(where)}"
                            f"{f' ({total} non-finite values in all)' if total > 1 else ''}: "
                            "drop or impute those rows before fitting or evaluating")


def check_row_counts(data: ProgramData, names: dict, failure: Exception) -> None:
    """Where the model failed on arguments of several row counts, say so first: x of 100 rows
    beside y of 90 is a mismatch of the data, not of the model."""
    sizes = {key: v.shape[0] for key, v in data.tensors() if v.dim()}
    if len(set(sizes.values())) < 2:
        return
    listed = ", ".join(f"{names.get(k, k)} has {n} rows" for k, n in sizes.items())
    raise DataError(f"the arguments' row counts differ ({listed}) and the model fails on them: "
                    f"every per-point array needs one row per data point ({failure})") from failure


def check_observed_rows(model_trace: Trace, data: ProgramData, names: dict,
                        rows: int | None, data_plate: str | None) -> None:
    """Refuse an observed argument, at a site inside the data plate, whose row count is not
    the plate's (y of 90 rows beside x of 100): the model would score the wrong rows, or fail
    on their shapes.  Observations in a plate of their own (items beside users) are not
    rows of the data plate."""
    if rows is None or data_plate is None:
        return
    for name, site in sample_sites(model_trace).items():
        if not site["is_observed"] or data_frame(site, data_plate) is None:
            continue
        for key, v in data.tensors():
            if v is site["value"] and v.dim() and v.shape[0] != rows:
                others = ", ".join(f"{names.get(k, k)} has {u.shape[0]}" for k, u in
                                   data.tensors() if u.dim() and u.shape[0] == rows)
                raise DataError(f"{names.get(key, key)}, observed at site '{name}', has "
                                f"{v.shape[0]} rows but the data plate indexes {rows} "
                                f"({others}): every per-point array needs one row per point")


def check_observed_support(model_trace: Trace, data: ProgramData, names: dict,
                           data_plate: str | None) -> None:
    """Refuse an observed value outside its distribution's support (0.5 under a Bernoulli, -1
    under a Poisson), naming the site, the argument that holds it and the row."""
    for name, site in sample_sites(model_trace).items():
        if not site["is_observed"]:
            continue
        fn, value = site["fn"], site["value"]
        # Only the data as handed in (or a view of it): a value the model computed is the
        # model's, and Pyro's own validation speaks for it.
        holder = next((names.get(k, k) for k, v in data.tensors() if torch.is_tensor(value)
                       and v.numel() == value.numel() and v.data_ptr() == value.data_ptr()),
                      None)
        if holder is None:
            continue
        try:
            ok = fn.support.check(value)
        except (NotImplementedError, ValueError, RuntimeError):
            continue  # a dependent support, or one torch cannot check: Pyro's own check stands
        if not torch.is_tensor(ok) or bool(ok.all()):
            continue
        bad = ~ok
        where = _position(bad)
        row = None
        frame = data_frame(site, data_plate) if data_plate is not None else None
        if frame is not None and frame.size == frame.full_size and bad.dim() + frame.dim >= 0:
            row = where[bad.dim() + frame.dim]
        shown = value[tuple(where)] if value.dim() >= len(where) else value
        at = f"row {row}" if row is not None else _said(where)
        raise DataError(
            f"observed site '{name}' ({holder}): value "
            f"{_value(shown)} at {at} is outside the support of {type(fn).__name__} "
            f"({_support(fn.support)}); {int(bad.sum())} value(s) in all")


def _position(bad: torch.Tensor) -> list[int]:
    return bad.nonzero()[0].tolist() if bad.dim() else []


def _said(where: list[int]) -> str:
    if not where:
        return "its only value"
    return f"row {where[0]}" + (f", column {', '.join(map(str, where[1:]))}" if len(where) > 1
                                else "")


def _value(v: torch.Tensor) -> str:
    if v.numel() == 1:
        return f"{v.item():g}"
    return f"{v.flatten()[:4].tolist()}"


def _support(support) -> str:
    from torch.distributions import constraints

    said = {constraints.boolean: "0 or 1", constraints.nonnegative_integer: "integers >= 0",
            constraints.positive: "> 0", constraints.real: "finite reals",
            constraints.unit_interval: "[0, 1]", constraints.simplex: "a probability vector"}
    for known, words in said.items():
        if support is known:
            return words
    return str(support)
