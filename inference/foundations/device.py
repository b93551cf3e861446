"""Where tensors live: ``auto``, ``cpu`` or ``cuda[:i]``, and moving a pair's parameters there.

A pair's parameters are created on the CPU when it is first traced (building a model, an
autoguide's prototype trace, a ``pyro.param`` initial value).  ``move_pair`` moves them in
place, as ``nn.Module.to`` does, so the Pyro param store and every module keep referring to the
same tensors; the pair must create the tensors it makes on each call where its data are
(``x.new_zeros(...)``, ``device=x.device``), as any PyTorch code that runs on a GPU must.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import pyro
import torch
from torch import nn

from .errors import OptionError
from .parameter_scope import in_scope_of, unscoped

DEVICES = "auto, cpu, cuda or cuda:INDEX"
CPU = torch.device("cpu")
# Particles x data points per chunk in evaluate: bounded memory on a CPU's caches, and rows
# enough to fill a GPU (65 536 rows of 784 logits are 200 MB).
ROWS_PER_CHUNK = {"cpu": 4096, "cuda": 65536}


def resolve_device(spec: str | torch.device | None = "auto", local_rank: int | None = None
                   ) -> torch.device:
    """The device ``spec`` names; ``auto`` is the GPU of this process (``LOCAL_RANK`` under
    torchrun) when CUDA is available, else the CPU."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = spec or "auto"
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    kind, _, index = spec.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise OptionError("device", f"{{option}} {spec!r}: expected {DEVICES}")
    if not torch.cuda.is_available():
        raise OptionError("device", f"{{option}} {spec}: torch sees no CUDA device here "
                                    f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
                                    "use cpu or auto")
    i = int(index) if index else local_rank
    if i >= torch.cuda.device_count():
        raise OptionError("device", f"{{option}} {spec}: there are {torch.cuda.device_count()} "
                                    f"CUDA devices here (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", i)


def rows_per_chunk(device: torch.device) -> int:
    return ROWS_PER_CHUNK.get(device.type, ROWS_PER_CHUNK["cuda"])


def modules_of(fn: Callable) -> list[nn.Module]:
    """The nn.Modules a model or guide callable holds: itself (autoguides, PyroModules), the
    object of a bound method, and modules in its closure or partial arguments."""
    found: list[nn.Module] = []

    def visit(obj, depth=0):
        # A program bound to its arguments (``program_data.bound``) names the user's callable.
        obj = unscoped(getattr(obj, "program", obj))
        if isinstance(obj, nn.Module):
            if all(obj is not m for m in found):
                found.append(obj)
            return
        if depth > 2:
            return
        if hasattr(obj, "__self__"):
            visit(obj.__self__, depth + 1)
        if isinstance(obj, functools.partial):
            visit(obj.func, depth + 1)
            for a in (*obj.args, *obj.keywords.values()):
                visit(a, depth + 1)
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                visit(cell.cell_contents, depth + 1)
            except ValueError:  # an empty cell
                pass

    visit(fn)
    return found


def move_pair(model: Callable, guide: Callable, device: torch.device) -> None:
    """Move the pair's modules and the param store's values to ``device``.  A module keeps its
    Parameter objects where torch can move them in place (CPU and GPU); where it cannot, the
    store is pointed at the module's new ones, so store and modules still share tensors."""
    modules = modules_of(model) + modules_of(guide)
    owner = {id(p): (m, name) for m in modules for name, p in m.named_parameters()}
    for module in modules:
        module.to(device)
    store = pyro.get_param_store()
    with torch.no_grad(), in_scope_of(model, guide):
        for name, value in list(store._params.items()):
            if value.device == device:
                continue
            if id(value) in owner:
                module, attribute = owner[id(value)]
                moved = module.get_parameter(attribute)
            else:
                moved = value.detach().to(device).requires_grad_(value.requires_grad)
            # Pyro 1.9's store keeps a name per tensor beside the tensor per name.
            store._params[name] = moved
            store._param_to_name.pop(value, None)
            store._param_to_name[moved] = name
