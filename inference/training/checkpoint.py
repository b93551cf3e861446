"""Checkpoints of Pyro's parameter store and optimizer, restored into any model/guide pair.

A checkpoint is data, never code: tensors and plain containers only (the random streams'
states too, as tensors), read with ``torch.load(weights_only=True)``.  A run directory is what
people share, and a pickle may carry a command that unpickling runs; a file that needs more
than tensors and plain containers (written before this format, or crafted) is refused with the
way to convert one that is trusted (``convert_trusted_checkpoint``).

Parameters are saved by their param-store names in unconstrained form.  Restoring first runs the
pair once so that every ``pyro.param``/``pyro.module`` parameter exists, then copies the saved
values in place: the tensors stay the very ones the nn.Modules hold, so restoring works for
modules and bare ``pyro.param`` sites alike.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pyro
import torch

from ..foundations.atomic import write_atomic
from ..foundations.errors import ConfigError
from ..foundations.parameter_scope import in_scope_of
from ..foundations.program_data import as_program_data, bound_program
from ..foundations.reading import read_regular_file
from ..foundations.rng import (
    rng_preserved,
    rng_state,
    rng_state_as_tensors,
    rng_state_from_tensors,
)
from ..foundations.traces import trace_pair
from .parameters import pair_parameters


def save_checkpoint(path: str | Path, optimizer_state: dict | None = None,
                    params: dict[str, torch.Tensor] | None = None, **extra: object) -> None:
    """Write the parameters (by default the param store's) and the optimizer's state to
    ``path`` atomically."""
    if params is None:
        params = dict(pyro.get_param_store().named_parameters())
    _write(path, _streams({
        "params": {name: p.detach().clone() for name, p in params.items()},
        "optimizer": optimizer_state,
        "rng": rng_state(),
        **extra,
    }, rng_state_as_tensors))


def _write(path: str | Path, state: dict) -> None:
    def write(f):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        f.write(buffer.getvalue())

    write_atomic(path, write)


def _streams(state: dict, convert: Callable[[dict], dict]) -> dict:
    """``state`` with the random streams' states it holds (``rng``, ``rng_per_rank``)
    converted: to tensors for writing, back for restoring."""
    state = dict(state)
    if isinstance(state.get("rng"), dict):
        state["rng"] = convert(state["rng"])
    if state.get("rng_per_rank"):
        state["rng_per_rank"] = [convert(s) for s in state["rng_per_rank"]]
    return state


def load_checkpoint(
    path: str | Path,
    model: Callable,
    guide: Callable,
    x_example: torch.Tensor,
) -> dict:
    """Load parameters saved by ``save_checkpoint`` into the pair; return the whole state
    (its ``optimizer`` entry is for ``ElboStep.load_state_dict``).  ``x_example`` is data the
    pair runs on, which creates its parameters: for an autoguide, the data it was built for."""
    state = read_checkpoint(path)
    # Running the pair draws random numbers; a restore must not change the random stream.
    with rng_preserved(), torch.no_grad(), in_scope_of(model, guide):
        trace_pair(bound_program(model), bound_program(guide), as_program_data(x_example))
    current = pair_parameters(model, guide)
    missing = sorted(set(current) - set(state["params"]))
    unknown = sorted(set(state["params"]) - set(current))
    if missing or unknown:
        raise ConfigError(
            f"{path}: checkpoint does not match the model/guide pair "
            f"(parameters not in the checkpoint: {missing}; in the checkpoint only: {unknown})"
        )
    with torch.no_grad():
        for name, value in state["params"].items():
            if current[name].shape != value.shape:
                raise ConfigError(
                    f"{path}: parameter '{name}' has shape {tuple(value.shape)} in the checkpoint "
                    f"but {tuple(current[name].shape)} in the pair (different sizes?)"
                )
            current[name].copy_(value)
    return state


def checkpoint_records(state: dict) -> int:
    """How many records of metrics.jsonl a checkpoint's state goes with (one per epoch where
    the checkpoint predates the count)."""
    return state.get("records", state["epoch"])


CONVERT = ("if you trust whoever wrote it, convert it once with python -c \"from "
           "elbogap.training.checkpoint import convert_trusted_checkpoint as c; c('{path}')\"")


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint's contents, read as data: tensors and plain containers only."""
    path = Path(path)
    if not os.path.lexists(path):  # a link, a device: refused when read
        raise ConfigError(f"{path}: no checkpoint file")
    saved = read_regular_file(path)
    try:
        state = torch.load(io.BytesIO(saved), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Torch names the global a pickle asks for; other refusals are of bytes that are no pickle.
        if "Weights only load failed" not in str(e) or "GLOBAL" not in str(e):
            raise ConfigError(f"{path}: not a readable checkpoint (truncated or corrupted: "
                              f"{_damage(e)})") from None
        raise ConfigError(
            f"{path}: holds objects other than tensors and plain containers (written by an "
            "elbogap before 2026-11-30, or crafted): loading it would run code it carries, so "
            f"it is not loaded; {CONVERT.format(path=path)}") from None
    except Exception as e:  # torch raises several types for a truncated or damaged file
        raise ConfigError(f"{path}: not a readable checkpoint ({_first(e)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("params"), dict) or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in state["params"].items()):
        raise ConfigError(f"{path}: not an elbogap checkpoint (no 'params' table of tensors)")
    for key, kind, what in (("epoch", int, "an integer"), ("optimizer", dict, "a table"),
                            ("rng", dict, "a table of tensors")):
        if key in state and state[key] is not None and not isinstance(state[key], kind):
            raise ConfigError(f"{path}: its '{key}' must be {what}, got "
                              f"{type(state[key]).__name__}")
    for key in ("epoch", "records"):
        value = state.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 0):
            raise ConfigError(f"{path}: its '{key}' must be a count of epochs (an integer >= 0), "
                              f"got {value!r}")
    # Read with weights_only, the streams can only be in the form of tensors.
    try:
        return _streams(state, rng_state_from_tensors)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ConfigError(f"{path}: its random streams' states are damaged ({_first(e)})"
                          ) from None


def convert_trusted_checkpoint(path: str | Path) -> None:
    """Rewrite a checkpoint of the older format (or any you trust) as data only.  This runs
    whatever the file carries: only for files whose author you trust."""
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=False)
    def as_tensors(streams: dict) -> dict:  # those still as rng_state() has them
        return (rng_state_as_tensors(streams) if isinstance(streams.get("numpy"), tuple)
                else streams)

    _write(path, _streams(state, as_tensors))
    read_checkpoint(path)  # it must now load as data


def _damage(e: Exception) -> str:
    """What torch found wrong with the bytes: its WeightsUnpickler's reason when it gives one."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = next((line for line in lines if line.startswith("Unsupported operand")), None)
    return reason or _first(e)


def _first(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
