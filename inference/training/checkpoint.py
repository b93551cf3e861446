"""Checkpoints of Pyro's parameter store and optimizer, restored into any model/guide pair.

Parameters are saved by their param-store names in unconstrained form.  Restoring first runs the
pair once so that every ``pyro.param``/``pyro.module`` parameter exists, then copies the saved
values in place: the tensors stay the very ones the nn.Modules hold, so restoring works for
modules and bare ``pyro.param`` sites alike.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pyro
import torch

from ..foundations.atomic import write_atomic
from ..foundations.errors import ConfigError
from ..foundations.program_data import as_program_data, bound_program
from ..foundations.rng import rng_preserved, rng_state
from ..foundations.traces import trace_pair
from .parameters import pair_parameters


def save_checkpoint(path: str | Path, optimizer_state: dict | None = None,
                    params: dict[str, torch.Tensor] | None = None, **extra: object) -> None:
    """Write the parameters (by default the param store's) and the optimizer's state to
    ``path`` atomically."""
    if params is None:
        params = dict(pyro.get_param_store().named_parameters())
    state = {
        "params": {name: p.detach().clone() for name, p in params.items()},
        "optimizer": optimizer_state,
        "rng": rng_state(),
        **extra,
    }

    def write(f):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        f.write(buffer.getvalue())

    write_atomic(path, write)


def load_checkpoint(
    path: str | Path,
    model: Callable,
    guide: Callable,
    x_example: torch.Tensor,
) -> dict:
    """Load parameters saved by ``save_checkpoint`` into the pair; return the whole state
    (its ``optimizer`` entry is for ``ElboStep.load_state_dict``).  ``x_example`` is data the
    pair runs on, which creates its parameters: for an autoguide, the data it was built for."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for a damaged file
        raise ConfigError(f"{path}: not a readable checkpoint ({e})") from None
    # Running the pair draws random numbers; a restore must not change the random stream.
    with rng_preserved(), torch.no_grad():
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
