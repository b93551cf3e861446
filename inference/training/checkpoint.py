"""Checkpoints of Pyro's parameter store and optimizer, restored into any model/guide pair.

Parameters are saved by their param-store names in unconstrained form.  Restoring first runs the
pair once so that every ``pyro.param``/``pyro.module`` parameter exists, then copies the saved
values in place: the tensors stay the very ones the nn.Modules hold, so restoring works for
modules and bare ``pyro.param`` sites alike.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyro
import torch

from inference.diagnostics.traces import trace_pair
from inference.errors import ConfigError
from inference.outputs.atomic import write_atomic
from inference.training.parameters import pair_parameters


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Draws on a GPU come from its own generators.
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


@contextmanager
def rng_preserved() -> Iterator[None]:
    """Run a block (a trace that creates parameters, say) without moving any random stream."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


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
        trace_pair(model, guide, x_example)
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
