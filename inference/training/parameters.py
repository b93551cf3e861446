"""The trainable tensors of a model/guide pair, wherever Pyro keeps them.

By default every ``pyro.param``, ``pyro.module`` and ``PyroModule`` parameter lives in Pyro's
global param store.  With ``pyro.settings.set(module_local_params=True)`` (what Pyro's
``examples/svi_torch.py`` recommends) a ``PyroModule`` keeps its parameters itself, and only
the module knows them: they are found on the model and guide objects (a ``PyroModule`` or an
autoguide called directly, or the object a bound method belongs to).
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from torch import nn

from ..foundations.parameter_scope import in_scope_of, unscoped


def _modules(fn: Callable) -> list[nn.Module]:
    fn = unscoped(getattr(fn, "program", fn))  # a program bound to its arguments (ProgramData)
    found = []
    for candidate in (fn, getattr(fn, "__self__", None)):
        if isinstance(candidate, nn.Module):
            found.append(candidate)
    return found


def pair_parameters(model: Callable, guide: Callable) -> dict[str, torch.Tensor]:
    """Name -> unconstrained parameter tensor: the param store's, then module-local ones
    (named ``model.…``/``guide.…``) that the store does not hold.  A loaded run's pair: its
    own store's (``parameter_scope``)."""
    with in_scope_of(model, guide):
        params = dict(pyro.get_param_store().named_parameters())
    if not pyro.settings.get("module_local_params"):
        return params
    seen = {id(p) for p in params.values()}
    for prefix, fn in (("model", model), ("guide", guide)):
        for module in _modules(fn):
            for name, p in module.named_parameters():
                if id(p) not in seen:
                    params[f"{prefix}.{name}"] = p
                    seen.add(id(p))
    return params
