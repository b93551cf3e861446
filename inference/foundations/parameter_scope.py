"""A model/guide pair's own parameters, beside those of other pairs in the same process.

Pyro keeps ``pyro.param`` values, ``pyro.module`` parameters and (unless
``module_local_params``) ``PyroModule`` parameters in one global param store, by name.  Two runs
loaded side by side whose pairs name their parameters alike (the ordinary Pyro idiom: "W",
"AutoNormal.locs.z") would share that store: the second load overwrites the first's values and
the first then evaluates silently with the second's parameters.  A ``ParameterScope`` holds a
store's contents of its own; ``scoped`` wraps a program so that the global store holds the
scope's contents while the program runs (Pyro's ``ParamStoreDict.scope``, entered per call),
and what the store held before is put back afterwards.

A scoped program is what ``Run.model`` and ``Run.guide`` are.  Code that reads the param store
itself rather than through the programs (an optimizer step of one's own, ``pyro.param("W")``)
does so inside ``with scope.active():`` (``Run.parameters()``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager, nullcontext
from typing import Any

import pyro

from .errors import ConfigError

# The scope whose contents the global param store holds now (None: the store's own).
_active: ParameterScope | None = None


class ParameterScope:
    """The contents of a param store of one's own (Pyro's ``get_state()`` form)."""

    def __init__(self) -> None:
        self.state: dict = {"params": {}, "constraints": {}}

    @contextmanager
    def active(self) -> Iterator[ParameterScope]:
        """Run a block with Pyro's global param store holding this scope's contents; what the
        block adds or replaces there stays the scope's, and the store holds what it held before
        once the block ends.  Nested entries of the same scope cost nothing."""
        global _active
        if _active is self:
            yield self
            return
        store = pyro.get_param_store()
        before, outer = store.get_state(), _active
        store.clear()
        store.set_state(self.state)
        _active = self
        try:
            yield self
        finally:
            self.state = store.get_state()
            store.clear()
            store.set_state(before)
            _active = outer

    def __len__(self) -> int:
        return len(self.state["params"])

    def __repr__(self) -> str:
        return f"ParameterScope({len(self)} parameters)"


class ScopedProgram:
    """A model or guide that runs with its ``ParameterScope`` active.  Attributes are the
    wrapped program's (an autoguide's ``median()``, ``quantiles()``...); its methods, too, run
    with the scope active."""

    def __init__(self, program: Callable, scope: ParameterScope) -> None:
        self.__wrapped__ = program
        self.parameter_scope = scope

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.parameter_scope.active():
            return self.__wrapped__(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in ("__wrapped__", "parameter_scope"):  # not yet set (a copy being made)
            raise AttributeError(name)
        value = getattr(self.__wrapped__, name)
        if callable(value) and not isinstance(value, type):
            return ScopedProgram(value, self.parameter_scope)
        return value

    def __repr__(self) -> str:
        return f"scoped({self.__wrapped__!r})"


def scoped(program: Callable, scope: ParameterScope) -> Callable:
    """``program`` run with ``scope`` active (a program already scoped keeps its own scope)."""
    return program if isinstance(program, ScopedProgram) else ScopedProgram(program, scope)


def unscoped(program: Callable) -> Callable:
    """The user's own callable behind a scoped program (itself when it is not one)."""
    while isinstance(program, ScopedProgram):
        program = program.__wrapped__
    return program


def scope_of(*programs: Callable | None) -> ParameterScope | None:
    """The scope the programs run in (seen through a program bound to its arguments), None
    for programs of the global store; programs of two different scopes are refused."""
    found = {id(s): s for p in programs if p is not None
             if (s := getattr(getattr(p, "program", p), "parameter_scope", None)) is not None}
    if len(found) > 1:
        raise ConfigError("the model and guide belong to different runs (each has parameters "
                          "of its own): pass the model and guide of one run")
    return next(iter(found.values()), None)


def in_scope_of(*programs: Callable | None) -> ContextManager:
    """A block in which the param store holds the programs' parameters: their scope's
    contents for scoped programs, the global store's as it is for any other."""
    scope = scope_of(*programs)
    return nullcontext() if scope is None else scope.active()
