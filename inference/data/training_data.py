"""Training data the way PyTorch and Pyro users hold it, as a ``Dataset`` that ``fit`` trains on.

``fit(model, guide, data)`` takes an elbogap ``Dataset`` (train and test splits), or the
program's arguments for one data set: one tensor ``x``, a tuple of tensors (positional
arguments), a dict (keyword arguments), a ``ProgramData``, a ``torch.utils.data.Dataset`` whose
items are any of those, or a ``DataLoader`` over one.  A loader is read whole, through its own
``collate_fn`` (a padding collate pads every sequence to the longest), and its ``batch_size``
becomes the minibatch size; the order of the minibatches is elbogap's own, drawn from the fit's
seed, so that a run can be repeated and resumed exactly (the loader's sampler is not used).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, default_collate
from torch.utils.data import Dataset as TorchDataset

from ..foundations.errors import DataError
from ..foundations.program_data import ProgramData
from .dataset import Dataset


def as_dataset(data: Any) -> tuple[Dataset, int | None]:
    """``data`` as a ``Dataset``, and the minibatch size a ``DataLoader`` asks for (else None).
    Program arguments make the training split; there is no test split then."""
    if isinstance(data, Dataset):
        return data, None
    batch_size = None
    if isinstance(data, DataLoader):
        batch_size = data.batch_size
        arguments = _read_whole(data.dataset, data.collate_fn)
    elif isinstance(data, TorchDataset):
        arguments = _read_whole(data, default_collate)
    else:
        arguments = data
    return Dataset(name="data", train=_program_data(arguments), test=None, image_shape=None,
                   likelihood="the model's"), batch_size


def _read_whole(dataset: TorchDataset, collate) -> Any:
    """Every item of a map-style dataset collated into one batch."""
    if isinstance(dataset, IterableDataset):
        raise DataError("fit needs the whole training set (to shuffle it, to scale minibatch "
                        "ELBOs by N / B and to diagnose the guide on it): an IterableDataset has "
                        "no length; hand fit a map-style Dataset or the tensors themselves")
    if isinstance(dataset, TensorDataset):
        return tuple(dataset.tensors)
    try:
        items = [dataset[i] for i in range(len(dataset))]
    except TypeError as e:
        raise DataError(f"fit reads a torch Dataset by index, 0 to len - 1: {e}") from e
    if not items:
        raise DataError("the training data set is empty")
    return collate(items)


def _program_data(arguments: Any) -> ProgramData:
    if isinstance(arguments, ProgramData):
        return arguments
    if torch.is_tensor(arguments):
        return ProgramData.of(arguments)
    if isinstance(arguments, dict):
        return ProgramData.of(**arguments)
    if isinstance(arguments, tuple | list):
        return ProgramData.of(*arguments)
    raise DataError(
        f"fit takes a Dataset, a tensor, a tuple or dict of the program's arguments, a torch "
        f"Dataset or a DataLoader; got {type(arguments).__name__}"
    )
