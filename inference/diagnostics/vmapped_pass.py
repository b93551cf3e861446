"""The terms of k particles of a pair that does not broadcast over a particle dimension, with
``torch.func.vmap`` over the particles (``foundations.particle_vmap``), and the check that
decides whether the pair may take that path.

A particle's pass is the plain one (``trace_pair`` on one particle, ``particle_terms`` with
k = 1): vmap only batches it.  ``with_vmap`` trusts it on a pair once it gave, on the same two
draws, the same terms as two plain passes; else evaluation goes particle by particle with a
note that names the cause.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace

import pyro
import torch
from pyro import poutine

from ..foundations.conventions import REPLAY_ATOL, REPLAY_RTOL
from ..foundations.log_density import log_density
from ..foundations.pair_layout import PairLayout, per_datapoint
from ..foundations.particle_vmap import (
    DRAWS_IN_A_LOOP,
    DRAWS_INSIDE,
    StackedDraws,
    unbatched_reason,
    vmapped_pair,
)
from ..foundations.rng import rng_preserved
from ..foundations.traces import trace_pair
from .terms import KLTerm, ParticleTerms, particle_terms

_DICTS = ("kl", "latent_mean")


def vmapped_terms(model: Callable, guide: Callable, x, layout: PairLayout, k: int,
                  data_plate: str, replay: StackedDraws | None = None,
                  guide_densities: tuple[str, ...] = ()
                  ) -> tuple[ParticleTerms, StackedDraws, dict[str, torch.Tensor]]:
    """The terms of ``k`` particles on ``x``, the draws they were computed at, and the
    unmasked log-density per point ``[k, N]`` of each guide site of ``guide_densities``;
    ``replay`` fixes the guide sites it holds (global ones, drawn on another batch)."""
    n = layout.rows(x)
    methods: dict[str, str] = {}
    given = replay
    if layout.vmap == DRAWS_IN_A_LOOP:
        traces = []
        with pyro.validation_enabled(False):
            for j in range(k):
                fixed = guide if replay is None else poutine.replay(guide, trace=replay.particle(j))
                traces.append(poutine.trace(fixed).get_trace(x))
        given = StackedDraws.of_traces(traces)

    def one(replay_trace):
        guide_trace, model_trace = trace_pair(model, guide, x, replay_guide=replay_trace)
        terms = particle_terms(guide_trace, model_trace, layout, data_plate, 1, n)
        methods.update({name: term.method for name, term in terms.kl.items()})
        densities = {}
        for name in guide_densities:
            site = guide_trace.nodes[name]
            densities[name] = per_datapoint(log_density(site["fn"], site["value"]), site,
                                            layout, data_plate).double()
        return (_flat(terms), densities), guide_trace

    randomness = "different" if layout.vmap == DRAWS_INSIDE else "error"
    with pyro.validation_enabled(False):
        (flat, densities), draws = vmapped_pair(one, k, given, randomness)
    return (_terms(flat, methods), draws, {name: v[:, 0] for name, v in densities.items()})


def with_vmap(model: Callable, guide: Callable, x, layout: PairLayout,
              data_plate: str) -> PairLayout:
    """``layout`` (of a pair that does not broadcast) with the vmapped path that gives, on two
    particles, the plain passes' terms at the same draws; else with the reason it has none."""
    reason = None
    for way in (DRAWS_INSIDE, DRAWS_IN_A_LOOP):
        trial = replace(layout, vmap=way)
        try:
            with rng_preserved():
                terms, draws, _ = vmapped_terms(model, guide, x, trial, 2, data_plate)
                found = _differs_from_loop(model, guide, x, layout, data_plate, terms, draws)
        except Exception as e:  # noqa: BLE001 - whatever vmap cannot take: the loop, with why
            found = unbatched_reason(e)
        if found is None:
            return replace(trial, loop_reason=None)
        reason = found
    return replace(layout, vmap=None, loop_reason=reason)


def _differs_from_loop(model, guide, x, layout: PairLayout, data_plate: str,
                       terms: ParticleTerms, draws: StackedDraws) -> str | None:
    """None where every term of each particle equals that of a plain pass at its draws; else
    which term differs."""
    n = layout.rows(x)
    vmapped_flat = _flat(terms)
    with pyro.validation_enabled(False):
        for j in range(len(draws)):
            guide_trace, model_trace = trace_pair(model, guide, x, replay_guide=draws.particle(j))
            plain = particle_terms(guide_trace, model_trace, layout, data_plate, 1, n)
            if {k: t.method for k, t in plain.kl.items()} != {
                    k: t.method for k, t in terms.kl.items()}:
                return "under vmap a KL was computed another way than in a plain pass"
            for key, value in _items(_flat(plain)):
                other = _lookup(vmapped_flat, key)
                if other is None or other[j:j + 1].shape != value.shape or not torch.allclose(
                        other[j:j + 1], value, rtol=REPLAY_RTOL, atol=REPLAY_ATOL,
                        equal_nan=True):
                    return (f"under vmap the term {'/'.join(key)} differs from a plain pass at "
                            "the same draws")
    return None


def _flat(terms: ParticleTerms) -> dict:
    out = {f.name: getattr(terms, f.name) for f in fields(terms)
           if getattr(terms, f.name) is not None}
    out["kl"] = {name: term.value for name, term in terms.kl.items()}
    return out


def _items(flat: dict, prefix: tuple = ()):
    for key, value in flat.items():
        if isinstance(value, dict):
            yield from _items(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _lookup(flat: dict, key: tuple):
    for part in key:
        flat = flat.get(part) if isinstance(flat, dict) else None
    return flat


def _terms(flat: dict, methods: dict[str, str]) -> ParticleTerms:
    """vmap's stacked outputs ``[k, 1, ...]`` (each particle's pass had k = 1) as k particles'."""
    def squeeze(t: torch.Tensor) -> torch.Tensor:
        return t[:, 0]

    values = {key: ({n: squeeze(v) for n, v in value.items()} if key in _DICTS
                    else squeeze(value)) for key, value in flat.items()}
    values["kl"] = {name: KLTerm(v, methods[name]) for name, v in values["kl"].items()}
    return ParticleTerms(**values)
