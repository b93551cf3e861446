"""A program's own arguments, as Pyro calls it: ``model(*args, **kwargs)``.

Users call ``svi.step(features, labels)``, ``svi.step()`` (a GP module holds its data) or
``svi.step(x, y=None, mask=m)``; every diagnostic takes the same arguments the same way.  Which of
them hold one row per data point is found from the data plate (``conventions.locate_data``): the
tensors whose leading dimension the plate indexes are *batched* and sliced batch by batch, the
rest are passed whole.  ``ProgramData`` answers the few questions the diagnostics ask of "x" —
how many rows (``shape[0]``, ``len``), a slice or a subset of rows (``data[s:e]``,
``data[indices]``), a device — so that one tensor ``x`` and any set of arguments go through the
same code; ``bound(fn)`` is the program called on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

Key = int | str


@dataclass(frozen=True)
class ProgramData:
    """Positional and keyword arguments of a program, and which of them are batched."""

    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    batched: frozenset[Key] = frozenset()
    # Set by ``data_plate.program_pair``: the plate found to index the batched rows (None: the
    # model observes its data as one whole), so that a diagnostic handed these data by another
    # does not look for it again.
    plate: str | None = None
    located: bool = False
    # Where the model lays out the discrete sites it enumerates (None: it enumerates none).
    enum_dim: int | None = None
    # The program's subsampling plates that its diagnostics run at full size
    # (``full_plates``): (name, N, the m it subsamples).
    widened: tuple[tuple[str, int, int], ...] = ()

    @classmethod
    def of(cls, *args: Any, **kwargs: Any) -> ProgramData:
        """The arguments as given, every tensor of the most common leading size batched
        (until ``with_rows`` says which size the data plate indexes)."""
        data = cls(tuple(args), dict(kwargs))
        sizes = [v.shape[0] for _, v in data.tensors() if v.dim()]
        return data.with_rows(max(set(sizes), key=sizes.count)) if sizes else data

    def items(self) -> Iterator[tuple[Key, Any]]:
        yield from enumerate(self.args)
        yield from self.kwargs.items()

    def tensors(self) -> Iterator[tuple[Key, torch.Tensor]]:
        return ((k, v) for k, v in self.items() if torch.is_tensor(v))

    def with_rows(self, rows: int | None) -> ProgramData:
        """The arguments with the tensors of leading size ``rows`` batched (none for None)."""
        batched = frozenset(k for k, v in self.tensors() if v.dim() and v.shape[0] == rows)
        return replace(self, batched=batched if rows is not None else frozenset())

    def like(self, template: ProgramData) -> ProgramData:
        """These arguments (another split of the same data) batched as ``template`` is."""
        keys = {k for k, v in self.tensors() if v.dim()}
        return replace(self, batched=frozenset(template.batched & keys), plate=template.plate,
                       located=template.located, enum_dim=template.enum_dim,
                       widened=template.widened)

    def leading_sizes(self) -> dict[int, list[Key]]:
        """Leading size -> the tensor arguments of that many rows."""
        sizes: dict[int, list[Key]] = {}
        for key, value in self.tensors():
            if value.dim():
                sizes.setdefault(value.shape[0], []).append(key)
        return sizes

    def _map(self, fn: Callable[[Key, Any], Any]) -> ProgramData:
        args = tuple(fn(i, v) for i, v in enumerate(self.args))
        kwargs = {k: fn(k, v) for k, v in self.kwargs.items()}
        return replace(self, args=args, kwargs=kwargs)

    def flat(self) -> tuple[torch.Tensor, ...]:
        """Every tensor argument, in order: what a recording of the program takes."""
        return tuple(v for _, v in self.tensors())

    def with_flat(self, tensors: tuple[torch.Tensor, ...]) -> ProgramData:
        """These arguments with their tensors, in ``flat``'s order, replaced by ``tensors``."""
        new = iter(tensors)
        return self._map(lambda _, v: next(new) if torch.is_tensor(v) else v)

    def flat_rows(self) -> torch.Tensor:
        """Every value of the batched tensors, as one float vector (all tensors where nothing
        is batched)."""
        values = [v.reshape(-1).double() for v in self._per_point()]
        return torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)

    def named_rows(self) -> dict[str, torch.Tensor]:
        """The batched tensors by name: a keyword's own, ``x`` for a lone positional one, else
        ``args[i]``."""
        lone = sum(1 for k in self.batched if isinstance(k, int)) == 1
        return {("x" if lone else f"args[{k}]") if isinstance(k, int) else k: v
                for k, v in self.tensors() if k in self.batched}

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ProgramData:
        """The arguments with ``fn`` applied to each batched tensor."""
        return self._map(lambda k, v: fn(v) if k in self.batched else v)

    def replaced(self, fn: Callable[[Any], Any]) -> ProgramData:
        """The arguments with each value ``v`` replaced by ``fn(v)``."""
        return self._map(lambda _, v: fn(v))

    @property
    def rows(self) -> int | None:
        """Data points the batched tensors hold (None: nothing is batched)."""
        for key, value in self.tensors():
            if key in self.batched:
                return value.shape[0]
        return None

    @property
    def shape(self) -> torch.Size:
        """``shape[0]`` is the number of rows, as for one tensor x (1 with nothing batched:
        the arguments are one observation)."""
        return torch.Size([self.rows if self.rows is not None else 1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> ProgramData:
        """The rows ``index`` (a slice or an index tensor) of every batched tensor."""
        if not self.batched:
            return self
        return self._map(lambda k, v: v[index] if k in self.batched else v)

    def to(self, device: torch.device | str) -> ProgramData:
        return self._map(lambda k, v: v.to(device) if torch.is_tensor(v) else v)

    @property
    def device(self) -> torch.device:
        return next((v.device for _, v in self.tensors()), torch.device("cpu"))

    @property
    def dtype(self) -> torch.dtype:
        return next((v.dtype for _, v in self.tensors() if v.is_floating_point()),
                    torch.get_default_dtype())

    def numel(self) -> int:
        """Values the batched tensors hold (everything, where nothing is batched)."""
        return sum(v.numel() for v in self._per_point())

    def _per_point(self) -> Iterator[torch.Tensor]:
        """The batched tensors; every tensor where nothing is batched (one observation)."""
        return (v for k, v in self.tensors() if k in self.batched or not self.batched)

    def call(self, fn: Callable) -> Any:
        return fn(*self.args, **self.kwargs)

    def __repr__(self) -> str:
        def show(key, value):
            shown = f"tensor{tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
            return shown + ("*" if key in self.batched else "")
        parts = [show(i, v) for i, v in enumerate(self.args)]
        parts += [f"{k}={show(k, v)}" for k, v in self.kwargs.items()]
        return f"ProgramData({', '.join(parts)}; *: one row per data point)"


def bound(fn: Callable) -> Callable[[ProgramData], Any]:
    """``fn`` as a program of one argument, its ``ProgramData``: what every diagnostic calls."""
    def program(data: ProgramData):
        return data.call(fn)

    program.program = fn
    return program


def bound_program(fn: Callable) -> Callable[[ProgramData], Any]:
    """``bound(fn)``, unless ``fn`` is bound already."""
    return fn if getattr(fn, "program", None) is not None else bound(fn)


def as_program_data(x: Any) -> ProgramData:
    """``x`` as program data: a ``ProgramData`` as it is, anything else one positional
    argument."""
    return x if isinstance(x, ProgramData) else ProgramData.of(x)


def described(x: Any) -> str:
    """How an error message names the data: ``x of shape (4, 1)`` for one tensor, else each
    argument (``arguments features of shape (4, 3), y of shape (4,)``)."""
    if torch.is_tensor(x):
        return f"x of shape {tuple(x.shape)}"
    if not isinstance(x, ProgramData):
        return repr(x)
    if not x.args and not x.kwargs:
        return "no arguments"
    if len(x.args) == 1 and not x.kwargs and torch.is_tensor(x.args[0]):
        return described(x.args[0])

    def show(key: Key, value: Any) -> str:
        name = f"args[{key}]" if isinstance(key, int) else key
        if torch.is_tensor(value):
            return f"{name} of shape {tuple(value.shape)}"
        return f"{name} = {type(value).__name__}"
    return "arguments " + ", ".join(show(k, v) for k, v in x.items())
