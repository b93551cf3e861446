"""A pair's ``nn.Module``s in evaluation mode while it is diagnosed.

A module left in training mode (a tutorial that never calls ``.eval()``) makes Dropout draw
fresh masks on every call and BatchNorm normalize with the statistics of whatever batch it is
handed: the estimates then carry randomness beyond the guide's draws, and a vectorized pass sees
other statistics than a plain one.  Diagnostics run with every module of the pair in evaluation
mode, and put each module's mode back afterwards; ``train_mode=True`` keeps training mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

from .device import modules_of

# Layers that compute differently in training mode.  A module of the user's own that reads
# self.training is not recognizable from outside; it is put in evaluation mode all the same.
TRAINING_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm,
                      nn.modules.instancenorm._InstanceNorm)


@contextmanager
def evaluation_mode(model: Callable, guide: Callable, train_mode: bool = False
                    ) -> Iterator[list[str]]:
    """Run a block with the pair's modules in evaluation mode (unless ``train_mode``); yields
    the notes a diagnosis reports about it (none where no layer depends on the mode)."""
    tops = modules_of(model) + modules_of(guide)
    saved = [(m, m.training) for top in tops for m in top.modules()]
    layers = sorted({type(m).__name__ for m, training in saved
                     if training and isinstance(m, TRAINING_DEPENDENT)})
    notes = []
    if layers and train_mode:
        notes.append(f"the pair's modules were left in training mode (train_mode=True): its "
                     f"{', '.join(layers)} layers make every estimate random beyond the guide's "
                     "draws")
    elif layers:
        notes.append(f"the pair's modules were evaluated in evaluation mode (module.eval()): its "
                     f"{', '.join(layers)} layers compute otherwise in training mode, in which "
                     "they were left (train_mode=True keeps it)")
    if not train_mode:
        for top in tops:
            top.eval()
    try:
        yield notes
    finally:
        for module, training in saved:
            module.training = training
