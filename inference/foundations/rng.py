"""Every random stream a run draws from (torch's, a GPU's, Python's, NumPy's), saved and put
back: a checkpoint carries them, and work that must not move them runs inside
``rng_preserved``."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


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


def rng_state_as_tensors(state: dict) -> dict:
    """``rng_state()`` in tensors and plain values only, so that a checkpoint holding it loads
    with ``torch.load(weights_only=True)`` (NumPy's key array would need unpickling code)."""
    name, keys, pos, has_gauss, cached = state["numpy"]
    version, words, gauss_next = state["python"]
    out = {"torch": state["torch"],
           "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64),
                      "gauss_next": gauss_next},
           "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                     "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}}
    if "cuda" in state:
        out["cuda"] = state["cuda"]
    return out


def rng_state_from_tensors(saved: dict) -> dict:
    """The inverse of ``rng_state_as_tensors``."""
    py, npy = saved["python"], saved["numpy"]
    state = {"torch": saved["torch"],
             "python": (py["version"], tuple(py["words"].tolist()), py["gauss_next"]),
             "numpy": (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                       npy["has_gauss"], npy["cached"])}
    if "cuda" in saved:
        state["cuda"] = saved["cuda"]
    return state


@contextmanager
def rng_preserved() -> Iterator[None]:
    """Run a block (a trace that creates parameters, say) without moving any random stream."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


@contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run a block on torch's streams (the CPU's, and ``device``'s if a GPU) seeded by ``seed``,
    every stream put back afterwards: draws that must not depend on what ran before them."""
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
