"""Mirror modes: global sites whose components the program cannot tell apart.

A mixture whose components are exchangeable (Pyro's Gaussian-mixture tutorial: ``locs`` in a
plate of K components, the assignments summed out or drawn with them) has a posterior with K!
mirror images of every mode: permuting the components, and whatever is indexed by them, leaves
log p(x, z) unchanged.  A unimodal guide sits in one of them, and importance sampling or AIS
from it sees that one alone: where the modes are well separated they estimate log p(x) low by
log K!, and Pareto k-hat, which reads only the draws it has, cannot see a mode none of them
visits.

``find_symmetry`` tests the program for it on the guide's draws: for each plate of global
latent sites of size K >= 2, a transposition and a K-cycle of its components (which generate
every permutation) applied to the sites in the plate, with and without the global sites whose
last event dimension has K entries (mixture weights) and the local discrete sites of K values
(assignments the guide draws), must leave log p(x, z) unchanged to rounding.

``mode_averaged`` is the estimate that accounts for them: importance sampling with the guide
symmetrized over the K! permutations, q_sym(z) = mean over sigma of q(sigma z), whose weight at
a draw z ~ q is p(x, z) / q_sym(z) (p being invariant).  It needs q's density at the permuted
draws, so a guide with a density at any z (not an autoguide's point masses).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace

from ..foundations.pair_layout import PairLayout, per_datapoint
from ..foundations.particle_vmap import DRAWS_IN_A_LOOP, StackedDraws, vmapped_pair
from ..foundations.psis import pareto_khat
from ..foundations.statistics import log_mean_exp_with_se
from ..foundations.traces import (
    PARTICLE_PLATE,
    in_particles,
    is_point_mass,
    sample_sites,
    site_log_prob,
    traced_model,
)

# K! permutations at most scored per draw by the mode-averaged estimate.
MAX_PERMUTATIONS = 120
# log p(x, z) equal under a permutation: to float32 rounding of the program's sums.
INVARIANCE_RTOL, INVARIANCE_ATOL = 1e-5, 1e-3
DRAWS_CHECKED = 3


@dataclass(frozen=True)
class Symmetry:
    """Components of ``plate`` (``size`` of them) that permute without changing log p(x, z):
    the sites in the plate (``sites``), those whose last event dimension indexes the components
    (``event_sites``), and discrete sites whose values name them (``value_sites``)."""

    plate: str
    size: int
    # (name, dimension of the value that is the plate's, counted from the right)
    sites: tuple[tuple[str, int], ...]
    event_sites: tuple[str, ...] = ()
    value_sites: tuple[str, ...] = ()

    @property
    def mirror_modes(self) -> int:
        return math.factorial(self.size)

    def permuted(self, values: dict[str, torch.Tensor], perm: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
        out = dict(values)
        for name, dim in self.sites:
            out[name] = values[name].index_select(dim, perm.to(values[name].device))
        for name in self.event_sites:
            out[name] = values[name].index_select(-1, perm.to(values[name].device))
        inverse = torch.argsort(perm)
        for name in self.value_sites:
            out[name] = inverse.to(values[name].device)[values[name].long()].to(
                values[name].dtype)
        return out

    def describe(self) -> str:
        named = [name for name, _ in self.sites] + list(self.event_sites) + list(
            self.value_sites)
        return (f"permuting the {self.size} components of plate '{self.plate}' (sites "
                f"{named}) leaves log p(x, z) unchanged on the guide's draws")


def _latents(model: Callable, guide: Callable, x) -> tuple[dict, dict]:
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = traced_model(poutine.replay(model, trace=guide_trace), x)
    sites = {n: s for n, s in sample_sites(model_trace).items() if not s["is_observed"]}
    return {n: s["value"] for n, s in sites.items()}, sites


def _invariant(model: Callable, x, layout: PairLayout, draws: list[dict],
               symmetry: Symmetry) -> bool:
    k = symmetry.size
    perms = [torch.tensor([1, 0] + list(range(2, k)))]
    if k > 2:
        perms.append(torch.tensor(list(range(1, k)) + [0]))
    for values in draws:
        base = float(_log_density(poutine.condition(model, data=values), x, layout, 1))
        for perm in perms:
            moved = float(_log_density(poutine.condition(model, data=symmetry.permuted(
                values, perm)), x, layout, 1))
            if not math.isclose(moved, base, rel_tol=INVARIANCE_RTOL, abs_tol=INVARIANCE_ATOL):
                return False
    return True


def find_symmetry(model: Callable, guide: Callable, x, layout: PairLayout,
                  data_plate: str | None) -> Symmetry | None:
    """The exchangeable components of the pair, if it has any (see the module's docstring);
    None where it has none, or where the test cannot be run on it."""
    try:
        with torch.no_grad(), pyro.validation_enabled(False):
            draws, sites = [], None
            for _ in range(DRAWS_CHECKED):
                values, sites = _latents(model, guide, x)
                draws.append(values)
            for symmetry in _candidates(sites, layout, data_plate):
                if _invariant(model, x, layout, draws, symmetry):
                    return symmetry
    except Exception:  # noqa: BLE001 - a program the test cannot permute claims no symmetry
        return None
    return None


def _candidates(sites: dict, layout: PairLayout, data_plate: str | None) -> list[Symmetry]:
    plates: dict[str, tuple[int, list]] = {}
    for name, site in sites.items():
        if name not in layout.global_sites:
            continue
        for frame in site["cond_indep_stack"]:
            if not frame.vectorized or frame.name in (PARTICLE_PLATE, data_plate) \
                    or frame.size < 2:
                continue
            dim = frame.dim - site["fn"].event_dim  # from the right: particles add on the left
            plates.setdefault(frame.name, (frame.size, []))[1].append((name, dim))
    out = []
    for plate, (size, in_plate) in plates.items():
        if size > 5:  # 6! = 720 permutations: past what the estimate can score
            continue
        named = {n for n, _ in in_plate}
        event = tuple(n for n, s in sites.items()
                      if n in layout.global_sites and n not in named and s["fn"].event_dim
                      and s["value"].shape[-1] == size)
        value = tuple(n for n, s in sites.items()
                      if n not in layout.global_sites and s["fn"].support.is_discrete
                      and s["fn"].has_enumerate_support
                      and s["fn"].enumerate_support(expand=False).shape[0] == size)
        out.append(Symmetry(plate, size, tuple(in_plate)))
        if event or value:
            out.append(Symmetry(plate, size, tuple(in_plate), event, value))
    return out


@dataclass(frozen=True)
class ModeAveraged:
    """log p(x) by importance sampling from the guide symmetrized over the K! permutations."""

    log_evidence: float
    log_evidence_se: float
    khat: float
    num_samples: int

    def as_dict(self) -> dict:
        return {"log_evidence": self.log_evidence, "log_evidence_se": self.log_evidence_se,
                "khat": self.khat, "num_samples": self.num_samples}


def mode_averaged(model: Callable, guide: Callable, x, layout: PairLayout, symmetry: Symmetry,
                  num_samples: int, chunk: int = 100) -> ModeAveraged | str:
    """The mode-averaged estimate, or why it cannot be taken (a string).  Draws in the
    particle plate, ``chunk`` at a time, where the pair broadcasts over it; under vmap where
    its pass is vmapped (``layout.vmap``, its first chunk checked against plain passes at the
    same draws); else one at a time."""
    if symmetry.mirror_modes > MAX_PERMUTATIONS:
        return (f"{symmetry.mirror_modes} permutations per draw, more than "
                f"{MAX_PERMUTATIONS} to score")
    perms = [torch.tensor(p) for p in itertools.permutations(range(symmetry.size))]
    with torch.no_grad(), pyro.validation_enabled(False):
        latent = {n: s for n, s in sample_sites(poutine.trace(guide).get_trace(x)).items()
                  if not s["is_observed"]}
        if any(is_point_mass(s["fn"]) for s in latent.values()):
            return ("the guide's sites are point masses driven by auxiliary sites (an "
                    "autoguide), whose density at a permuted draw is not defined")
        vmap_way = layout.vmap
        per_pass = chunk if layout.vectorized or vmap_way is not None else 1
        log_w = []
        for done in range(0, num_samples, per_pass):
            k = min(per_pass, num_samples - done)
            if vmap_way is not None and k > 1:
                w = _vmapped_weights(model, guide, x, layout, symmetry, perms, k, vmap_way,
                                     check=done == 0)
                if w is not None:
                    log_w.append(w)
                    continue
                vmap_way, per_pass = None, 1  # what vmap gave differs: one at a time
                log_w.extend(_weights(model, guide, x, layout, symmetry, perms, None)[0]
                             for _ in range(k))
                continue
            log_w.append(_weights(model, guide, x, layout, symmetry, perms,
                                  k if k > 1 else None)[0])
    log_w = torch.cat(log_w).unsqueeze(1)
    estimate, se = log_mean_exp_with_se(log_w)
    return ModeAveraged(float(estimate[0]), float(se[0]), float(pareto_khat(log_w)[0]),
                        num_samples)


def _weights(model: Callable, guide: Callable, x, layout: PairLayout, symmetry: Symmetry,
             perms: list, particles: int | None, given: Trace | None = None
             ) -> tuple[torch.Tensor, Trace]:
    """log p(x, z) - log mean_sigma q(sigma z) of ``particles`` draws (None: one, in no
    plate) ``[k]``, and the guide's trace of the draws; ``given`` replays the guide's draws."""
    k = particles or 1
    g = in_particles(guide, particles, layout.particle_dim)
    m = in_particles(model, particles, layout.particle_dim)
    drawn = g if given is None else poutine.replay(g, trace=given)
    guide_trace = poutine.trace(drawn).get_trace(x)
    values = {n: s["value"] for n, s in sample_sites(guide_trace).items()
              if not s["is_observed"]}
    log_q = [_log_density(poutine.condition(g, data=symmetry.permuted(values, perm)),
                          x, layout, k, values)
             for perm in perms]
    log_q_sym = torch.logsumexp(torch.stack(log_q), 0) - math.log(len(perms))
    return (_log_density(poutine.condition(m, data=values), x, layout, k) - log_q_sym,
            guide_trace)


def _vmapped_weights(model: Callable, guide: Callable, x, layout: PairLayout,
                     symmetry: Symmetry, perms: list, k: int, way: str,
                     check: bool) -> torch.Tensor | None:
    """``_weights`` of k draws under vmap (``way`` as ``layout.vmap``); with ``check``, None
    unless its first two equal plain passes' at the same draws."""
    given = None
    if way == DRAWS_IN_A_LOOP:
        given = StackedDraws.of_traces([poutine.trace(guide).get_trace(x) for _ in range(k)])

    def one(replay):
        w, guide_trace = _weights(model, guide, x, layout, symmetry, perms, None, replay)
        return w[0], guide_trace

    try:
        w, draws = vmapped_pair(one, k, given)
    except Exception:  # noqa: BLE001 - what vmap cannot take here: one at a time
        return None
    if check:
        for j in range(2):
            plain, _ = _weights(model, guide, x, layout, symmetry, perms, None,
                                draws.particle(j))
            if not torch.allclose(w[j:j + 1], plain, rtol=1e-4, atol=1e-3):
                return None
    return w


def _log_density(program: Callable, x, layout: PairLayout, k: int,
                 only: dict | None = None) -> torch.Tensor:
    """The summed log-density of a program's sites (those in ``only``, where given) per
    particle, ``[k]``."""
    trace = traced_model(program, x) if only is None else poutine.trace(program).get_trace(x)
    total = torch.zeros(k, dtype=torch.float64)
    for name, site in sample_sites(trace).items():
        if only is None or name in only:
            total = total + per_datapoint(site_log_prob(site), site, layout, None).double(
            ).sum(1).expand(k)
    return total


def symmetry_note(symmetry: Symmetry, result: ModeAveraged | str, log_evidence: float) -> str:
    k = symmetry.size
    bound = math.lgamma(k + 1)
    said = (f"{symmetry.describe()}: the posterior has {k}! = {symmetry.mirror_modes} mirror "
            f"modes and a unimodal guide covers one, so importance sampling and AIS from it "
            f"can estimate log p(x) low by up to log {k}! = {bound:.3f} nats (where the modes "
            "are well separated), which k-hat cannot see")
    if isinstance(result, str):
        return f"{said}; no mode-averaged estimate: {result}"
    return (f"{said}; mode-averaged (the guide symmetrized over the permutations, "
            f"K={result.num_samples}): log p(x) = {result.log_evidence:.3f} ± "
            f"{result.log_evidence_se:.3f}, {result.log_evidence - log_evidence:+.3f} from the "
            "guide's own estimate")
