"""Data-parallel training and evaluation on torch.distributed, launched by ``torchrun``.

Every rank holds the whole model and guide.  A training step splits one global minibatch across
the ranks; each rank's loss is scaled so that the average of the ranks' gradients is exactly the
single-process gradient of the global minibatch, and that average is all-reduced before Adam
steps (identically on every rank, so parameters stay equal).  Evaluation splits the data points
and gathers the per-point results back in their original order.

Without torchrun (no WORLD_SIZE in the environment) ``Distributed.from_environment`` returns a
single-process context and every function here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from .device import resolve_device
from .errors import ElbogapError, OptionError
from .keyed_noise import point_seeds, stream_key
from .rng import seeded

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: str | torch.device = "cpu",
                         threads: int | None = None) -> Distributed:
        """This process's device (``auto``: its GPU, ``LOCAL_RANK`` under torchrun, when CUDA
        is available) and, under torchrun, the process group it joins (nccl on GPUs, else
        gloo).  ``threads`` sets torch's CPU threads."""
        if threads is not None:
            if threads < 1:
                raise OptionError("threads", f"must be a positive integer, got {threads}")
            torch.set_num_threads(threads)
        device = resolve_device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls(device=device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)

    def say(self, text: str) -> None:
        """Print on the first rank only."""
        if self.is_main:
            print(text)

    def shard(self, size: int) -> slice:
        """This rank's contiguous part of ``range(size)``; parts differ by at most one."""
        base, extra = divmod(size, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def average_gradients(self, params: list[torch.Tensor], loss: float) -> float:
        """Replace every gradient by its mean over ranks (missing gradients count as zero);
        return the mean of ``loss`` over ranks, reduced in the same message so that every rank
        sees the same value (and stops together if it is not finite)."""
        if not self.enabled:
            return loss
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [grads[0].new_tensor([loss])])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n
        return flat[-1].item()

    def broadcast_parameters(self, params: list[torch.Tensor]) -> None:
        """Make every rank start from rank 0's values."""
        if not self.enabled:
            return
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        # nccl reduces only tensors on the GPU.
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.item() / self.world_size

    def common_seed(self, seed: int | None) -> int:
        """``seed``, or one drawn from torch's stream where it is None; rank 0's on every rank,
        so that work keyed by it does not depend on the ranks' own streams."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        return self.gather(int(seed))[0]

    def gather(self, obj: object) -> list[object]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 only.  If it raises an ElbogapError, every rank raises it, so
        that no rank is left waiting in a collective for one that stopped."""
        error = None
        value = None
        if self.is_main:
            try:
                value = fn()
            except ElbogapError as e:
                error = e
        errors = [e for e in self.gather(error) if e is not None]
        if errors:
            raise errors[0]
        return value

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            # No rank closes its connections while another may still be reading from them (a
            # gloo rank aborted at exit once in CI without this).
            dist.barrier()
            dist.destroy_process_group()

    def abort(self) -> None:
        """Leave the process group at once, after an error: waiting at a barrier the others
        never reach (they are inside a collective of the work) would hang every rank; closed
        connections make theirs fail instead, and torchrun stops them."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    @contextmanager
    def session(self) -> Iterator[Distributed]:
        """The work of a command: on success ``shutdown``, on an error ``abort``."""
        try:
            yield self
        except BaseException:
            self.abort()
            raise
        self.shutdown()


SINGLE = Distributed()


def over_point_groups(work: Callable[[int, int], T], num_points: int, group_size: int,
                      seed: int, stream: str, distributed: Distributed = SINGLE,
                      device: torch.device | str = "cpu") -> list[T]:
    """``work(start, stop)`` on every group of ``group_size`` consecutive points, each group on
    torch's streams seeded from ``seed`` and its first point, the groups dealt to the ranks in
    turn; every rank gets every group's result, in order.  The groups and their seeds do not
    depend on the number of ranks, so neither do the results.  ``seed`` must be the same on
    every rank (``Distributed.common_seed``)."""
    if group_size < 1:
        raise OptionError("group_size", f"must be a positive integer, got {group_size}")
    starts = list(range(0, num_points, group_size))
    seeds = point_seeds(stream_key(seed, stream), 0, num_points)
    mine = {}
    for i, start in enumerate(starts):
        if i % distributed.world_size == distributed.rank:
            with seeded(seeds[start], device):
                mine[i] = work(start, min(start + group_size, num_points))
    results: dict[int, T] = {}
    for part in distributed.gather(mine):
        results.update(part)
    return [results[i] for i in range(len(starts))]
