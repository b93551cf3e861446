"""Passes of a pair over data: the arguments checked, the batches of x a pass covers, the layout
of each batch, and the terms of k particles (one vectorized pass in a particle plate; for a pair
that does not broadcast over it, one pass under ``torch.func.vmap`` where that was found to
give the plain passes' terms, else one pass per particle).

Every estimator of this layer walks data the same way: ``evaluate`` per data point (each
batch's K draws its own), and the joint estimators of a data set (``joint_chunks``: every batch
of a chunk of particles shares the same draws of the global sites).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pyro
import torch
from pyro.poutine.trace_struct import Trace

from ..foundations.conventions import inspect_pair
from ..foundations.errors import ConfigError, ConventionError, OptionError
from ..foundations.pair_layout import PairLayout, global_part
from ..foundations.particle_vmap import StackedDraws
from ..foundations.progress import tqdm
from ..foundations.traces import FixedSubsample, particle, trace_pair
from .terms import ParticleTerms, particle_terms
from .vmapped_pass import vmapped_terms, with_vmap


def checked_arguments(x: torch.Tensor, num_samples: int, batch_size: int | None,
                      caller: str) -> int:
    """The batch size to use, after refusing arguments that cannot work."""
    if num_samples < 1:
        raise OptionError("num_samples", f"(K) must be a positive integer, got {num_samples}")
    if x.shape[0] == 0:
        raise ConfigError(f"{caller} got an empty data set (x has 0 rows)")
    batch_size = x.shape[0] if batch_size is None else batch_size
    if batch_size < 1:
        raise OptionError("batch_size", f"must be a positive integer, got {batch_size}")
    return batch_size


def first_layout(model: Callable, guide: Callable, x: torch.Tensor, batch_size: int,
                 data_plate: str, verified: set | None = None,
                 replay_particles: bool = True) -> tuple[PairLayout, int]:
    """The first batch's layout, and the batch size to use.  A guide with parameters per data
    point (an autoguide on local latents) runs only on the whole data set it was built for.
    ``verified``, ``replay_particles``: as ``inspect_pair`` takes them."""
    try:
        return pass_layout(model, guide, x[:batch_size], data_plate, verified,
                           replay_particles), batch_size
    except ConventionError:
        if batch_size >= x.shape[0]:
            raise
    # If the whole data set fails too, its error is the one that explains.
    return pass_layout(model, guide, x, data_plate, verified, replay_particles), x.shape[0]


def pass_layout(model: Callable, guide: Callable, x: torch.Tensor, data_plate: str,
                verified: set | None = None, replay_particles: bool = True) -> PairLayout:
    """``inspect_pair``'s layout, with the vmapped path for a pair that does not broadcast
    (``vmapped_pass.with_vmap``), unless a single particle is all that will be drawn.  As the
    broadcast check, the vmap check runs once per batch shape of a call (``verified``)."""
    layout = inspect_pair(model, guide, x, data_plate, verified, replay_particles)
    if layout.vectorized or not replay_particles:
        return layout
    key = ("vmap", tuple(x.shape), layout.latent, layout.observed)
    for entry in verified or ():
        if entry[:4] == key:
            return replace(layout, vmap=entry[4], loop_reason=entry[5])
    layout = with_vmap(model, guide, x, layout, data_plate)
    if verified is not None:
        verified.add((*key, layout.vmap, layout.loop_reason))
    return layout


@dataclass
class Batch:
    """One pass's data: the pair (possibly with fixed subsample indices), what it is called
    with, and how many of the pass's rows are points not seen before (``keep``)."""

    start: int
    x: torch.Tensor
    model: Callable
    guide: Callable
    keep: int


def batches(model: Callable, guide: Callable, x: torch.Tensor, batch_size: int,
            layout: PairLayout, data_plate: str) -> Iterator[Batch]:
    """Slices of x; or, for a pair whose plate picks its own minibatch of x
    (``pyro.plate("data", len(x), subsample_size=B)``), the whole x with the plate handed
    indices s..s+B-1 in turn (wrapping at the end, the repeats then dropped)."""
    n = x.shape[0]
    if layout.subsample is None:
        for s in range(0, n, batch_size):
            xb = x[s : s + batch_size]
            yield Batch(s, xb, model, guide, xb.shape[0])
        return
    m = layout.subsample
    for s in range(0, n, m):
        indices = torch.arange(s, s + m, device=x.device) % n
        yield Batch(s, x, FixedSubsample(data_plate, indices)(model),
                    FixedSubsample(data_plate, indices)(guide), min(m, n - s))


def vectorization_notes(layout: PairLayout) -> list[str]:
    if layout.vectorized:
        return []
    if layout.vmap is not None:
        return [f"the pair does not broadcast over a leading particle dimension: its particles "
                f"are vectorized with torch.func.vmap ({layout.vmap}), which gave a plain "
                "pass's terms at the same draws"]
    cause = f": vmap could not take it ({layout.loop_reason})" if layout.loop_reason else ""
    return ["the pair does not broadcast over a leading particle dimension and is evaluated one "
            f"particle at a time{cause} (slower; see the README, 'What elbogap needs from "
            "your program')"]


def traced_particles(model: Callable, guide: Callable, x: torch.Tensor, layout: PairLayout,
                     k: int, replay=None) -> list:
    """``(guide_trace, model_trace)`` covering ``k`` particles: one vectorized pass, or ``k``
    passes for a pair that does not broadcast (and one plain pass for a single particle, which
    needs no plate).  ``replay`` fixes global guide sites (a trace with the particle dimension,
    or a list of ``k`` traces)."""
    # Pyro's argument and support checks ran in inspect_pair; on every chunk they would cost
    # about a tenth of the time (measured with cProfile) and find nothing new.
    with pyro.validation_enabled(False):
        if layout.vectorized and k > 1:
            return [trace_pair(model, guide, x, k, layout.particle_dim, replay)]
        return [trace_pair(model, guide, x, replay_guide=None if replay is None else replay[j])
                for j in range(k)]


def particles_of(model: Callable, guide: Callable, x: torch.Tensor, layout: PairLayout, k: int,
                 data_plate: str, replay=None) -> tuple[ParticleTerms, Trace | list | StackedDraws]:
    """The terms of ``k`` particles on ``x``, and the global guide sites they were drawn at,
    to replay on other batches (in the form ``replay`` takes for this layout: a trace in the
    particle plate, a list of k traces, or the vmapped path's stacked draws)."""
    if layout.vmap is not None and k > 1:
        with pyro.validation_enabled(False):
            terms, draws, _ = vmapped_terms(model, guide, x, layout, k, data_plate, replay)
        return terms, draws.only(layout.global_sites)
    terms, passes = traced_terms(model, guide, x, layout, k, data_plate, replay)
    drawn = [global_part(g, layout) for g, _ in passes]
    return terms, drawn[0] if layout.vectorized and k > 1 else drawn


def traced_terms(model: Callable, guide: Callable, x: torch.Tensor, layout: PairLayout, k: int,
                 data_plate: str, replay=None) -> tuple[ParticleTerms, list]:
    """The terms of ``k`` particles from traces of the pair (in the particle plate, or one
    pass per particle), and those ``(guide, model)`` traces."""
    passes = traced_particles(model, guide, x, layout, k, replay)
    per = [particle_terms(g, m, layout, data_plate, k if len(passes) == 1 else 1, layout.rows(x))
           for g, m in passes]
    return ParticleTerms.cat(per), passes


def replay_as(replay, layout: PairLayout, k: int, particle_dim: int
              ) -> tuple[Trace | list | StackedDraws | None, PairLayout]:
    """Global draws made on one batch (``particles_of``'s form for its layout), in the form
    this batch's ``layout`` replays, and the layout to use (a batch handed per-particle draws
    goes particle by particle where it cannot take them as they are)."""
    if replay is None:
        return None, layout
    if isinstance(replay, Trace):  # in the particle plate
        if layout.vectorized and k > 1:
            return replay, layout
        replay = [particle(replay, j, particle_dim) for j in range(k)]
    if layout.vmap is not None and k > 1:
        if isinstance(replay, list):
            replay = StackedDraws.of_traces(replay)
        return replay, layout
    if isinstance(replay, StackedDraws):
        replay = [replay.particle(j) for j in range(k)]
    return replay, replace(layout, vectorized=False) if k > 1 else layout


def joint_chunks(model, guide, x, first: PairLayout, batch_size: int, num_samples: int,
                 data_plate: str, rows_per_chunk: int, progress: bool):
    """For each chunk of ``k`` particles: ``(k, batches)``, where ``batches`` yields
    ``(start row, layout, ParticleTerms)`` for every batch of x, the global guide sites drawn on
    the first batch and replayed on the others (so every batch sees the same k draws)."""
    n = x.shape[0]
    particles_per_chunk = max(1, rows_per_chunk // min(first.subsample or batch_size, n))
    layouts: dict[int, PairLayout] = {0: first}
    verified: set = set()
    chunks = range(0, num_samples, particles_per_chunk)
    if progress:
        chunks = tqdm(chunks, desc="evaluate", unit="chunk")

    def chunk(k):
        replay = None
        for b in batches(model, guide, x, batch_size, first, data_plate):
            if b.start not in layouts:
                layouts[b.start] = pass_layout(b.model, b.guide, b.x, data_plate, verified)
            replay_here, layout = replay_as(replay, layouts[b.start], k, first.particle_dim)
            terms, drawn = particles_of(b.model, b.guide, b.x, layout, k, data_plate,
                                        replay_here)
            if replay is None:
                replay = drawn
            yield b.start, layout, terms.first_points(b.keep)

    for done in chunks:
        k = min(particles_per_chunk, num_samples - done)
        yield k, chunk(k)
