"""Early stopping on the validation ELBO, with the best epoch's parameters kept (in memory and in
``best.pt``, from which a resumed run takes them back)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..foundations.errors import OptionError
from .checkpoint import read_checkpoint, save_checkpoint
from .options import FitOptions
from .plan import EvaluationPlan
from .schedule import epochs_since_best

BEST = "best.pt"


class EarlyStopping:
    """Stop once the watched (validation) ELBO has not risen for ``patience`` epochs, and leave
    the pair with the parameters of its best epoch."""

    def __init__(self, patience: int, run_dir: Path | None, writes: bool = True):
        self.patience, self.run_dir, self.writes = patience, run_dir, writes
        self.best: dict[str, torch.Tensor] | None = None
        self.best_epoch: int | None = None

    @classmethod
    def check(cls, options: FitOptions, plan: EvaluationPlan, run_dir: Path | None,
              writes: bool = True) -> EarlyStopping | None:
        if options.patience is None:
            return None
        if not (plan.held_out and plan.monitored == "validation"):
            why = ("the pair is diagnosed on its training set" if not plan.held_out
                   else "the data has no validation split (Dataset.with_validation, "
                   "--val-fraction)")
            raise OptionError("patience", f"{{option}} stops on the ELBO of a validation split, "
                              f"but {why} (the test set must not choose the model)")
        return cls(options.patience, run_dir, writes)

    def restore(self, history: list[dict], watched: str,
                current: dict[str, torch.Tensor]) -> None:
        if not history:
            return
        self.best_epoch = history[len(history) - 1 - epochs_since_best(
            [r[watched] for r in history])]["epoch"]
        path = self.run_dir / BEST if self.run_dir is not None else None
        if self.best_epoch == history[-1]["epoch"]:
            self.best = {name: p.detach().clone() for name, p in current.items()}
        elif path is not None and path.is_file():
            self.best = read_checkpoint(path)["params"]
        else:
            raise OptionError("patience", f"{{option}}: the run's best epoch was "
                              f"{self.best_epoch}, but its parameters are not in {path}")

    def after_epoch(self, epoch: int, history: list[dict], watched: str,
                    current: dict[str, torch.Tensor]) -> bool:
        """Keep this epoch's parameters if it is the best so far; whether to stop now."""
        since = epochs_since_best([r[watched] for r in history])
        if since == 0:
            self.best_epoch = epoch
            self.best = {name: p.detach().clone() for name, p in current.items()}
            if self.run_dir is not None and self.writes:
                save_checkpoint(self.run_dir / BEST, params=current, epoch=epoch)
        return since >= self.patience

    def stop(self, current: dict[str, torch.Tensor]) -> dict:
        with torch.no_grad():
            for name, p in current.items():
                p.copy_(self.best[name].to(p.device))
        return {"best_epoch": self.best_epoch, "patience": self.patience}
