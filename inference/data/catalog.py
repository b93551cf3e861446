"""The data sets by name: what ``--data`` and ``load_dataset`` accept."""

from __future__ import annotations

from pathlib import Path

from ..foundations.errors import DataError, DataOptionError
from .dataset import Dataset
from .readers import load_array, load_binarized_mnist, load_digits, load_frey_face, load_mnist
from .synthetic import load_synthetic

DATASETS = ("digits", "synthetic", "mnist", "binarized_mnist", "frey_face", "array")


def load_dataset(name: str, path: str | Path | None = None, binarize: str = "dynamic") -> Dataset:
    """``digits`` (bundled), ``synthetic`` (drawn from a fixed factor-analysis model), or
    ``mnist``, ``binarized_mnist``, ``frey_face``, ``array`` read from ``path``."""
    if name == "digits":
        return load_digits()
    if name == "synthetic":
        return load_synthetic()
    if path is None:
        raise DataOptionError("path", f"data set '{name}' is read from files: pass their directory "
                                      "({option})")
    loaders = {
        "mnist": lambda: load_mnist(path, binarize),
        "binarized_mnist": lambda: load_binarized_mnist(path),
        "frey_face": lambda: load_frey_face(path),
        "array": lambda: load_array(path),
    }
    if name not in loaders:
        raise DataError(f"unknown data set '{name}', expected one of {['digits', 'synthetic', *loaders]}")
    return loaders[name]()
