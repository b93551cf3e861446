"""A data set as elbogap holds it: float tensors of shape ``[N, D]`` for its splits, and the
fixed random subsets that every run and report draws from them."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..foundations.errors import DataOptionError
from ..foundations.program_data import ProgramData

# Fixed seed for everything that makes a data set (splits, fixed binarizations): the data a
# run sees must not depend on the training seed.
DATA_SEED = 0


def subset_indices(total: int, n: int | None, seed: int = DATA_SEED) -> torch.Tensor:
    """Indices of ``n`` of ``total`` rows in a fixed random order (all of them, in order, when
    ``n`` is None or not smaller).  Never the first n: files such as Larochelle's binarized MNIST
    test set are sorted by class, and their first rows are all zeros."""
    if n is None or n >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]


def subset(x: torch.Tensor, n: int | None, seed: int = DATA_SEED) -> torch.Tensor:
    """``n`` rows of ``x`` chosen by ``subset_indices``: a smaller n gives a subset of a larger."""
    return x[subset_indices(x.shape[0], n, seed)]


@dataclass
class Dataset:
    """Train and test splits; ``likelihood`` says which observation model fits the values.

    With ``dynamic_binarization`` the train split holds grey levels in [0, 1] and every epoch
    draws a fresh Bernoulli binarization of it (``train_epoch``); the test split is binarized once.
    """

    name: str
    # Tensors [N, D]; or a program's arguments (``ProgramData``), as ``fit`` makes of the
    # tensors, loaders and datasets users hand it (``elbogap.data.training_data``).
    train: torch.Tensor | ProgramData
    test: torch.Tensor | ProgramData | None
    image_shape: tuple[int, int] | None
    likelihood: str
    dynamic_binarization: bool = False
    # Rows held out of the training set to watch during training instead of the test set.
    validation: torch.Tensor | ProgramData | None = None

    @classmethod
    def from_tensors(cls, train, test=None, *, validation=None, name: str = "data",
                     image_shape: tuple[int, int] | None = None) -> Dataset:
        """A data set of one's own tensors, for one's own model: each split a tensor of one row
        per point, or the program's arguments for it (a tuple or dict of tensors,
        ``ProgramData``).  The likelihood is the model's own (nothing is assumed of the values);
        ``image_shape`` only where the rows are images to draw."""
        splits = {"train": train, "test": test, "validation": validation}
        for split, value in splits.items():
            if value is not None and not (torch.is_tensor(value) or isinstance(
                    value, ProgramData | tuple | list | dict)):
                raise DataOptionError(split, f"must be a tensor or the program's arguments "
                                             f"(a tuple or dict of tensors), got "
                                             f"{type(value).__name__}")
        if train is None:
            raise DataOptionError("train", "a data set needs its training split")
        as_data = {k: _as_program_data(v) for k, v in splits.items()}
        if image_shape is not None and torch.is_tensor(train) and \
                train[0].numel() != image_shape[0] * image_shape[1]:
            raise DataOptionError("image_shape", f"{{option}} {image_shape} does not hold a row "
                                                 f"of {train[0].numel()} values")
        return cls(name=name, train=as_data["train"], test=as_data["test"],
                   validation=as_data["validation"], image_shape=image_shape,
                   likelihood="the model's")

    def __repr__(self) -> str:
        # The splits' shapes, not their values: a notebook cell shows a line, not a tensor dump.
        splits = ", ".join(f"{name} {tuple(split.shape)}" for name, split in
                           (("train", self.train), ("test", self.test),
                            ("validation", self.validation)) if split is not None)
        return f"Dataset({self.name!r}: {splits}; likelihood {self.likelihood})"

    @property
    def data_dim(self) -> int:
        """Values per data point (of every per-point argument, for a program's arguments)."""
        return int(self.train.numel() // max(1, self.train.shape[0]))

    def with_validation(self, fraction: float, seed: int = DATA_SEED) -> Dataset:
        """This data set with ``fraction`` of its training rows (a fixed random subset) moved
        to a validation split; dynamically binarized rows are binarized once, like the test set."""
        if not 0 < fraction < 1:
            raise DataOptionError("val_fraction", f"must be between 0 and 1 (exclusive), got {fraction}")
        n = self.train.shape[0]
        held = int(round(fraction * n))
        if not 0 < held < n:
            raise DataOptionError("val_fraction", f"{{option}} {fraction} of {n} training points "
                                  "leaves no validation or no training point")
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=g)
        validation = self.train[order[:held]]
        if self.dynamic_binarization:
            validation = _binarized(validation, g)
        return replace(self, train=self.train[order[held:]], validation=validation)

    def train_epoch(self, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.dynamic_binarization:
            return _binarized(self.train, generator)
        return self.train


def _as_program_data(value):
    """A split as ``Dataset`` holds it: a tensor stays one, arguments become ``ProgramData``."""
    if value is None or torch.is_tensor(value) or isinstance(value, ProgramData):
        return value
    if isinstance(value, dict):
        return ProgramData.of(**value)
    return ProgramData.of(*value)


def _binarized(x: torch.Tensor | ProgramData, generator: torch.Generator | None):
    """A Bernoulli draw of grey levels: of x, or of a program's per-point arguments."""
    if isinstance(x, ProgramData):
        return x.map_rows(lambda v: torch.bernoulli(v, generator=generator))
    return torch.bernoulli(x, generator=generator)
