"""Annealed importance sampling (AIS) of log p(x), and its bidirectional certificate (BDMC).

For every data point, chains move along the geometric path

    pi_t(z) ∝ base(z)^(1 - beta_t) p(x, z)^beta_t,    beta_0 = 0 < ... < beta_T = 1,

from ``base`` = the guide q(z | x) (default) or the prior p(z) to the posterior, with Hamiltonian
Monte Carlo transitions (Neal 2001; Wu, Burda, Salakhutdinov & Grosse 2017).  Each chain's weight
accumulates (beta_t - beta_{t-1}) [log p(x, z) - log base(z)]; the mean of the weights over chains
estimates p(x) without bias, so its log is a stochastic lower bound that tightens as the number of
steps grows.  Where importance sampling with q fails (Pareto k-hat > 0.7), AIS still converges.

Latent sites are moved in the unconstrained space of their support (``biject_to``, with the
Jacobian), all chains x data points in one tensor pass per leapfrog step; a pair that does not
broadcast over a particle dimension (``PairLayout.vectorized``) is evaluated with
``torch.func.vmap`` over the chains (``VmappedPath``, once it gave the chain-by-chain terms and
gradients at the same states), else chain by chain, so that every pair has this second opinion.
With global latents a chain's state is the whole data set's z, and the estimate is of
log p(x_1..N).  Step sizes are adapted
per chain and data point towards an acceptance rate of 0.65 (as ``lxuechen/BDMC``: x1.02 above,
x0.98 below, clamped to [1e-4, 0.5]).

``bdmc`` certifies an AIS setting on data simulated from the model; ``ais_beside_importance`` sets
AIS beside importance sampling on the same points.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import torch
from pyro import poutine
from torch.distributions import biject_to

from ..foundations.conventions import inspect_pair
from ..foundations.data_plate import takes_program_arguments
from ..foundations.device import rows_per_chunk as default_rows_per_chunk
from ..foundations.distributed import SINGLE, Distributed
from ..foundations.errors import ConventionError, OptionError
from ..foundations.keyed_noise import KeyedNoise, point_seeds, stream_key
from ..foundations.module_mode import evaluation_mode
from ..foundations.pair_layout import PairLayout, per_datapoint
from ..foundations.particle_vmap import unbatched_reason, vmapped
from ..foundations.program_data import ProgramData
from ..foundations.progress import tqdm
from ..foundations.psis import KHAT_UNRELIABLE
from ..foundations.rng import rng_preserved, seeded
from ..foundations.statistics import log_mean_exp_with_se, mean_and_se
from ..foundations.traces import (
    apply_mask,
    check_conditioned,
    data_frame,
    first_line,
    guide_is_a_function_of_x,
    in_particles,
    sample_sites,
    site_log_prob,
    traced_model,
)
from ..foundations.wording import counted
from .evaluation import evaluate
from .guide_density import AuxiliaryDensity, auxiliary_density
from .passes import checked_arguments

STARTS = ("guide", "prior")
TARGET_ACCEPTANCE = 0.65
STEP_SIZE_RANGE = (1e-4, 0.5)


def sigmoid_schedule(num_steps: int, rad: float = 4.0) -> torch.Tensor:
    """beta_0..beta_T: a sigmoid over [-rad, rad], rescaled to run from exactly 0 to exactly 1
    (Wu et al. 2017's schedule: small steps near both ends, where the path bends most)."""
    if num_steps < 1:
        raise OptionError("num_steps", f"must be a positive integer, got {num_steps}")
    s = torch.sigmoid(torch.linspace(-rad, rad, num_steps + 1, dtype=torch.float64))
    return (s - s[0]) / (s[-1] - s[0])


@dataclass
class AnnealedEvidence:
    """Per data point: the AIS estimate of log p(x) and its Monte Carlo SE (delta method over
    chains), the ELBO of the chains' starting draws (start "guide"), acceptance rates and final
    step sizes (means over chains)."""

    log_evidence: torch.Tensor
    log_evidence_se: torch.Tensor
    log_weights: torch.Tensor  # [chains, N]
    acceptance: torch.Tensor
    step_size: torch.Tensor
    num_chains: int
    num_steps: int
    start: str
    elbo: torch.Tensor | None = None
    elbo_se: torch.Tensor | None = None
    unit: str = "data point"  # "data set" for global latents: one estimate of log p(x_1..N)
    notes: list[str] = field(default_factory=list)
    # Data points behind the estimates (the data set's N where there is one estimate of it).
    num_points: int = 0
    # The same number of chains with a fraction of the steps, beside the full schedule.
    convergence: dict | None = None

    @property
    def gap(self) -> torch.Tensor | None:
        """The AIS evidence gap log p̂(x) - ELBO, an estimate of KL(q(z|x) || p(z|x))."""
        return None if self.elbo is None else self.log_evidence - self.elbo

    @classmethod
    def concatenate(cls, parts: list[AnnealedEvidence]) -> AnnealedEvidence:
        """The estimates of consecutive shares of the points, as one."""
        if len(parts) == 1:
            return parts[0]

        def cat(name: str, dim: int = 0):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values, dim)

        first = parts[0]
        return cls(log_evidence=cat("log_evidence"), log_evidence_se=cat("log_evidence_se"),
                   log_weights=cat("log_weights", 1), acceptance=cat("acceptance"),
                   step_size=cat("step_size"), num_chains=first.num_chains,
                   num_steps=first.num_steps, start=first.start, elbo=cat("elbo"),
                   elbo_se=cat("elbo_se"), unit=first.unit,
                   notes=list(dict.fromkeys(n for p in parts for n in p.notes)),
                   num_points=sum(p.num_points for p in parts))

    def summary(self) -> dict:
        out = {"method": "ais", "unit": self.unit,
               "num_data": self.num_points or len(self.log_evidence),
               "num_chains": self.num_chains,
               "num_steps": self.num_steps, "start": self.start,
               "log_evidence": mean_and_se(self.log_evidence),
               "log_evidence_mc_se": self.log_evidence_se.double().mean().item(),
               "acceptance": mean_and_se(self.acceptance), "step_size": mean_and_se(self.step_size)}
        if self.elbo is not None:
            out["elbo"] = mean_and_se(self.elbo)
            out["evidence_gap"] = mean_and_se(self.gap)
        if self.convergence is not None:
            out["convergence"] = dict(self.convergence)
        if self.notes:
            out["notes"] = list(self.notes)
        return out


# A change of the estimate with the schedule's length below this is no change (nats): where
# every chain's weight is the same (q is the posterior) both SEs are 0.
CONVERGENCE_TOLERANCE = 1e-3


def convergence_check(full: AnnealedEvidence, shorter: AnnealedEvidence) -> dict:
    """AIS's estimate at a fraction of the schedule beside the full one.  AIS's log p̂ is a
    stochastic lower bound that rises with the number of steps to log p(x): where the full
    schedule is higher than its fraction by more than twice their Monte Carlo SE, the estimate
    is still rising, and the full one may be low too.  Independent chains: the SE of the
    difference is that of the two estimates together."""
    n = len(full.log_evidence)
    diff = (full.log_evidence - shorter.log_evidence).double()
    se = math.sqrt(float((full.log_evidence_se.double() ** 2
                          + shorter.log_evidence_se.double() ** 2).sum())) / n
    mean = float(diff.mean())
    short_mean = float(shorter.log_evidence.double().mean())
    full_mean = float(full.log_evidence.double().mean())
    said = (f"with {shorter.num_steps} of the {full.num_steps} steps the same number of chains "
            f"gives {short_mean:.3f}, the full schedule {full_mean:.3f}")
    if mean > 2 * se + CONVERGENCE_TOLERANCE:
        verdict, reading = "not converged", (
            f"AIS has not converged: {said}, higher by {mean:.3f} ± {se:.3f} nats; the "
            "estimate still rises with the number of steps, so it may be low too: raise "
            "num_steps (--ais-steps) until a fraction of the schedule agrees with the whole")
    elif mean < -(2 * se + CONVERGENCE_TOLERANCE):
        verdict, reading = "unsettled", (
            f"AIS fell with more steps ({said}, lower by {-mean:.3f} ± {se:.3f} nats), beyond "
            f"the two's Monte Carlo SEs: with weights this spread out, SEs over "
            f"{full.num_chains} chains understate the noise (or the chains do not mix), and "
            "neither estimate can be believed: more chains (num_chains) and more steps")
    else:
        verdict, reading = "converged", (
            f"AIS agrees with itself at a fraction of the schedule ({said}; difference "
            f"{mean:+.3f} ± {se:.3f} nats)")
    return {"num_steps": shorter.num_steps, "log_evidence": short_mean,
            "difference": {"mean": mean, "se": se}, "verdict": verdict, "reading": reading}


class AnnealingPath:
    """log p(x, z), log base(z) and the Jacobian for every chain and point, read off traces of
    the pair conditioned on z (all chains in a particle plate)."""

    def __init__(self, model: Callable, guide: Callable, x: torch.Tensor, layout: PairLayout,
                 chains: int, start: str, data_plate: str, supports: dict):
        self.x, self.layout, self.start, self.data_plate = x, layout, start, data_plate
        self.model = in_particles(model, chains, layout.particle_dim)
        self.guide = in_particles(guide, chains, layout.particle_dim)
        self.transforms = {name: biject_to(s) for name, s in supports.items()}
        self.chains = chains
        # With global latents a chain's state is the whole data set's z: one row, one weight.
        self.rows = x.shape[0] if layout.per_datapoint else 1
        # q(z | x) of a guide whose sites depend on x alone is the same at every step: its
        # distributions are read once (no encoder pass per leapfrog step).
        self.guide_sites = None
        self.auxiliary = _auxiliary(self.guide, x, start, supports)
        if start == "guide" and self.auxiliary is None and \
                guide_is_a_function_of_x(self.guide, x, tuple(supports)) is None:
            # Unvalidated: a leapfrog step may take z numerically out of the support.
            with torch.no_grad(), pyro.validation_enabled(False):
                self.guide_sites = sample_sites(poutine.trace(self.guide).get_trace(x))
        # The model's sites as they sit in a chain's state (their shapes in the chains' plate).
        with torch.no_grad():
            if start == "prior":
                trace = traced_model(self.model, x)
            else:
                guide_trace = poutine.trace(self.guide).get_trace(x)
                trace = traced_model(poutine.replay(self.model, trace=guide_trace), x)
        self.sites = sample_sites(trace)

    def state_event_dim(self, name: str) -> int:
        """The event dimensions of site ``name``'s chain state, which is unconstrained: fewer
        than the site's where its transform folds them (``LKJCholesky``'s matrix is a vector of
        its free entries there, ``CorrCholeskyTransform``)."""
        transform = self.transforms[name]
        return (self.sites[name]["fn"].event_dim + transform.domain.event_dim
                - transform.codomain.event_dim)

    def reduce(self, values: torch.Tensor, site: dict) -> torch.Tensor:
        out = per_datapoint(values, site, self.layout, self.data_plate)
        if not self.layout.per_datapoint:
            out = out.sum(1, keepdim=True)
        return out.expand(self.chains, self.rows)

    def terms(self, u: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log p(x, z), log base(z), log |det dz/du|), each [chains, N]."""
        return self._terms_with(u, self.reduce)

    def _terms_with(self, u: dict[str, torch.Tensor], reduce: Callable):
        """The three terms at state ``u``, each site's values reduced by ``reduce``."""
        z = {name: self.transforms[name](v) for name, v in u.items()}
        model_trace = traced_model(poutine.condition(self.model, data=z), self.x)
        check_conditioned(z, model_trace, "the model")
        sites = sample_sites(model_trace)
        joint = sum(reduce(site_log_prob(site), site) for site in sites.values())
        jacobian = sum(
            reduce(self.transforms[name].log_abs_det_jacobian(u[name], z[name]), sites[name])
            for name in u)
        if self.start == "prior":
            base = sum(reduce(site_log_prob(sites[name]), sites[name]) for name in u)
        elif self.auxiliary is not None:
            # An autoguide: its auxiliary sites set at u, each point mass adds log |du/dz|.
            aux = self.auxiliary.values(u)
            guide_trace = poutine.trace(poutine.condition(self.guide, data=aux)).get_trace(self.x)
            # Conditioned, the auxiliary sites read as observed: they are q's density here.
            base = sum(reduce(site_log_prob(site), site)
                       for name, site in sample_sites(guide_trace).items()
                       if name in aux or not site["is_observed"])
        elif self.guide_sites is not None:
            base = sum(reduce(apply_mask(self.guide_sites[name]["fn"].log_prob(z[name]),
                                         self.guide_sites[name]), self.guide_sites[name])
                       for name in u)
        else:
            guide_trace = poutine.trace(poutine.condition(self.guide, data=z)).get_trace(self.x)
            check_conditioned(z, guide_trace, "the guide")
            guide_sites = sample_sites(guide_trace)
            base = sum(reduce(site_log_prob(guide_sites[name]), guide_sites[name]) for name in u)
        return joint, base, jacobian

    def rows_shape(self, state: torch.Tensor, name: str) -> tuple[int, ...]:
        """The shape a [chains, N] tensor takes to broadcast against site ``name``'s state."""
        width = self.layout.max_plate_nesting + 1
        shape = [1] * state.dim()
        shape[state.dim() - self.state_event_dim(name) - width] = self.chains
        if (dim := self.point_dim(name, state)) is not None:
            shape[dim] = self.x.shape[0]
        return tuple(shape)

    def point_dim(self, name: str, state: torch.Tensor) -> int | None:
        """The dimension of site ``name``'s chain state that indexes data points (None where
        the chains' state is the whole data set's, or the site is outside the data plate)."""
        frame = data_frame(self.sites[name], self.data_plate)
        if not self.layout.per_datapoint or frame is None:
            return None
        return state.dim() - self.state_event_dim(name) + frame.dim

    def initial_state(self, key: int, first: int) -> dict[str, torch.Tensor]:
        """z_0 ~ base for every chain and point, in unconstrained space.  Point n (the
        ``first + n``-th of the call) draws alone, seeded from ``key`` and its index, so that
        its start is the same in any batch and on any rank (where the program runs on one row;
        else the batch draws together)."""
        if not self.layout.per_datapoint:
            with seeded(point_seeds(key, 0, 1)[0], self.x.device):
                return self._draws(self.x)
        parts = []
        for n, seed in enumerate(point_seeds(key, first, self.rows)):
            with seeded(seed, self.x.device):
                try:
                    one = self._draws(self.x[n: n + 1])
                    # A guide with parameters per point (an autoguide's plate of its full
                    # size) draws all its points for one row: not that point's start alone.
                    if any((d := self.point_dim(k, v)) is not None and v.shape[d] != 1
                           for k, v in one.items()):
                        raise ValueError("the guide draws more than one row for one point")
                    parts.append(one)
                except Exception:  # noqa: BLE001 - the user's program, on one row of x
                    # A program that runs only on all of its rows (a constant of N entries, an
                    # autoguide's parameters per point): its points draw their starts together,
                    # keyed by the batch's first point, so its numbers depend on the batch.
                    with seeded(point_seeds(key, first, 1)[0], self.x.device):
                        return self._draws(self.x)
        state = {}
        for name, value in parts[0].items():
            try:
                state[name] = torch.cat([p[name] for p in parts], self.point_dim(name, value))
            except (RuntimeError, TypeError) as e:
                raise ConventionError(
                    f"AIS draws each point's starting z alone (its numbers must not depend on "
                    f"the batch), but site '{name}' of one point does not stack with another's "
                    f"along the data plate ({first_line(e)}): pass batch_size=1") from e
        return state

    def _draws(self, x) -> dict[str, torch.Tensor]:
        trace = _base_draw(self.model, self.guide, x, self.start)
        return {name: self.transforms[name].inv(trace.nodes[name]["value"]).detach()
                for name in self.transforms}

    def noise(self, key: int, first: int, state: dict[str, torch.Tensor]) -> ChainNoise:
        """The chains' momenta and acceptance draws, keyed by point (see ``keyed_noise``)."""
        momentum = {name: KeyedNoise(stream_key(key, f"momentum/{name}"), v.shape,
                                     self.point_dim(name, v), first, v.device)
                    for name, v in state.items()}
        accept = KeyedNoise(stream_key(key, "accept"), (self.chains, self.rows),
                            1 if self.layout.per_datapoint else None, first, self.x.device)
        return ChainNoise(momentum, accept)

    def state_at(self, latents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every chain at the same latent values (BDMC's reverse chains start at the latents
        that generated the data), in unconstrained space."""
        u = {}
        for name, value in latents.items():
            target = self.sites[name]["value"].shape
            padded = value.reshape((1,) * (len(target) - value.dim()) + tuple(value.shape))
            u[name] = self.transforms[name].inv(padded.expand(target)).clone()
        return u


class ChainByChainPath(AnnealingPath):
    # Why the chains go one by one (vmap could not take the pair), for the result's notes.
    note: str | None = None

    """The same path for a pair that does not broadcast over a particle dimension: each chain's
    terms come from traces of the pair of its own, the chains' states stacked on a leading
    dimension (``[chains, *site shape]``).  Slower by the number of chains; correct for any
    pair that ``evaluate`` takes particle by particle."""

    def __init__(self, model: Callable, guide: Callable, x: torch.Tensor, layout: PairLayout,
                 chains: int, start: str, data_plate: str, supports: dict):
        self.x, self.layout, self.start, self.data_plate = x, layout, start, data_plate
        self.model, self.guide = model, guide
        self.transforms = {name: biject_to(s) for name, s in supports.items()}
        self.chains = chains
        self.rows = x.shape[0] if layout.per_datapoint else 1
        self.guide_sites = None
        self.auxiliary = _auxiliary(guide, x, start, supports)
        if start == "guide" and self.auxiliary is None and \
                guide_is_a_function_of_x(guide, x, tuple(supports)) is None:
            with torch.no_grad(), pyro.validation_enabled(False):
                self.guide_sites = sample_sites(poutine.trace(guide).get_trace(x))
        with torch.no_grad():
            self.sites = sample_sites(_base_draw(model, guide, x, start, model_trace=True))

    def _reduce_one(self, values: torch.Tensor, site: dict) -> torch.Tensor:
        out = per_datapoint(values, site, self.layout, self.data_plate)[0]
        return (out if self.layout.per_datapoint else out.sum(0, keepdim=True)).expand(self.rows)

    def reduce(self, values: torch.Tensor, site: dict) -> torch.Tensor:
        return torch.stack([self._reduce_one(values[c], site) for c in range(self.chains)])

    def terms(self, u: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        per_chain = [self._terms_with({name: v[c] for name, v in u.items()}, self._reduce_one)
                     for c in range(self.chains)]
        return tuple(torch.stack(part) for part in zip(*per_chain, strict=True))

    def rows_shape(self, state: torch.Tensor, name: str) -> tuple[int, ...]:
        shape = [1] * state.dim()
        shape[0] = self.chains
        if (dim := self.point_dim(name, state)) is not None:
            shape[dim] = self.x.shape[0]
        return tuple(shape)

    def _draws(self, x) -> dict[str, torch.Tensor]:
        draws = [_base_draw(self.model, self.guide, x, self.start) for _ in range(self.chains)]
        return {name: torch.stack([self.transforms[name].inv(t.nodes[name]["value"]).detach()
                                   for t in draws]) for name in self.transforms}

    def state_at(self, latents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        u = {}
        for name, value in latents.items():
            # The state's shape, not the site's: LKJCholesky's is a vector of free entries.
            one = self.transforms[name].inv(value.reshape(self.sites[name]["value"].shape))
            u[name] = one.expand((self.chains,) + tuple(one.shape)).clone()
        return u


class VmappedPath(ChainByChainPath):
    """The chain-by-chain path with ``torch.func.vmap`` over the chains: one pass of the pair
    on one chain's state, batched; gradients by autograd through it."""

    def terms(self, u: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return vmapped(lambda one: self._terms_with(one, self._reduce_one), self.chains, u,
                       "error")

    def reduce(self, values: torch.Tensor, site: dict) -> torch.Tensor:
        return torch.func.vmap(lambda one: self._reduce_one(one, site))(values)

    def both_ways(self, u: dict[str, torch.Tensor]) -> tuple[list, list]:
        """The terms at state ``u`` and their gradients, vmapped and chain by chain."""
        found = []
        for terms in (self.terms, super().terms):
            state = {k: v.detach().requires_grad_(True) for k, v in u.items()}
            with pyro.validation_enabled(False):
                values = terms(state)
            grads = torch.autograd.grad(sum(v.sum() for v in values), list(state.values()),
                                        allow_unused=True)
            found.append([v.detach() for v in values] + [g for g in grads if g is not None])
        return found[0], found[1]

    def differs(self) -> str | None:
        """None where, at the chains' starting states, the terms and their gradients equal the
        chain-by-chain ones; else the reason (what vmap could not take, or what differs)."""
        try:
            with rng_preserved():
                under_vmap, chain_by_chain = self.both_ways(self._draws(self.x))
        except Exception as e:  # noqa: BLE001 - what vmap cannot take: chain by chain, with why
            return unbatched_reason(e)
        for a, b in zip(under_vmap, chain_by_chain, strict=True):
            if a.shape != b.shape or not torch.allclose(a.double(), b.double(), rtol=1e-4,
                                                        atol=1e-3, equal_nan=True):
                return "under vmap a chain's log-density or its gradient differs from its own pass"
        return None


def _base_draw(model: Callable, guide: Callable, x: torch.Tensor, start: str,
               model_trace: bool = False):
    """One draw of z from the base (the guide, or the prior: the model with its observations
    uncondition-ed), traced; with ``model_trace`` the model's trace at it."""
    with torch.no_grad():
        if start == "guide":
            trace = poutine.trace(guide).get_trace(x)
            if model_trace:
                trace = traced_model(poutine.replay(model, trace=trace), x)
        else:
            trace = (traced_model(model, x) if model_trace
                     else poutine.trace(poutine.uncondition(model)).get_trace(x))
    return trace


def _check_pair(model: Callable, guide: Callable, x: torch.Tensor, start: str,
                data_plate: str) -> tuple[PairLayout, dict]:
    if start not in STARTS:
        raise OptionError("start", f"must be one of {STARTS}, got {start!r}")
    layout = inspect_pair(model, guide, x, data_plate)
    if layout.subsample is not None:
        raise ConventionError(f"plate '{data_plate}' picks its own minibatch of x: AIS needs the "
                              "pair to cover every point of x in one pass")
    with torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = traced_model(poutine.replay(model, trace=guide_trace), x)
    model_sites, guide_sites = sample_sites(model_trace), sample_sites(guide_trace)
    supports = {}
    for name in layout.latent:
        fn = model_sites[name]["fn"]
        if fn.support.is_discrete:
            raise ConventionError(f"latent site '{name}' is discrete: AIS with HMC moves only "
                                  "continuous latents (enumerate or marginalize it out)")
        if start == "guide" and name not in guide_sites:
            raise ConventionError(f"the guide has no site '{name}' to start the chains from: "
                                  "use start='prior' (--ais-start prior)")
        supports[name] = fn.support
    return layout, supports


def _auxiliary(guide: Callable, x, start: str, supports: dict) -> AuxiliaryDensity | None:
    """The autoguide's auxiliary sites as a function of z, read on a draw of ``guide`` as the
    path calls it (in the chains' plate, or one chain); an autoguide whose density cannot be
    read so is refused here, with the reason, as every path is built."""
    if start != "guide":
        return None
    with torch.no_grad(), pyro.validation_enabled(False):
        return auxiliary_density(poutine.trace(guide).get_trace(x), tuple(supports), supports)


@dataclass
class ChainNoise:
    """Where the chains' randomness comes from: each site's momenta and the acceptance
    uniforms, keyed by data point."""

    momentum: dict[str, KeyedNoise]
    accept: KeyedNoise


def anneal(path: AnnealingPath, u: dict[str, torch.Tensor], betas: torch.Tensor,
           leapfrog_steps: int, step_size: float, progress: bool, desc: str, noise: ChainNoise):
    """Run the chains from state ``u`` along ``betas``; return log-weights [chains, N], mean
    acceptance and final step sizes per chain and point, and the starting (joint - base).
    Every draw comes from ``noise``, so a point's chains are the same in any batch."""
    c, n = path.chains, path.rows
    eps = torch.full((c, n), step_size, dtype=path.x.dtype, device=path.x.device)
    running = torch.full_like(eps, TARGET_ACCEPTANCE)
    accepted = torch.zeros_like(eps)
    log_w = torch.zeros(c, n, dtype=torch.float64, device=path.x.device)
    shapes: dict[str, tuple[int, ...]] = {}

    def potential(state, beta):
        """-log pi_beta(u) per chain and point, its gradient, and log p - log base."""
        state = {k: v.detach().requires_grad_(True) for k, v in state.items()}
        # A leapfrog trajectory may leave the support numerically (exp of a large negative
        # u is 0): such a proposal gets a non-finite energy and is rejected, not refused.
        with pyro.validation_enabled(False):
            joint, base, jac = path.terms(state)
        log_pi = (1 - beta) * base + beta * joint + jac
        grads = torch.autograd.grad(log_pi.sum(), list(state.values()))
        return (-log_pi).detach(), dict(zip(state, (-g for g in grads), strict=True)), \
            (joint - base).detach()

    def broadcast(rows, name, value):
        if name not in shapes:
            shapes[name] = path.rows_shape(value, name)
        return rows.reshape(shapes[name])

    def kinetic(p):
        total = 0
        for name, v in p.items():
            sq = (v * v)
            if event_dim := path.state_event_dim(name):
                # Over the state's own event dimensions: fewer than the site's where its
                # transform folds them.
                sq = sq.sum(tuple(range(-event_dim, 0)))
            total = total + path.reduce(sq, path.sites[name])
        return 0.5 * total

    steps = tqdm(range(1, len(betas)), desc=desc, unit="step", disable=not progress)
    u_pot, u_grad, ratio = potential(u, float(betas[0]))
    start_ratio = ratio
    for t in steps:
        beta_prev, beta = float(betas[t - 1]), float(betas[t])
        log_w += (beta - beta_prev) * ratio.double()
        # The potential and gradient at the current state under the new beta.
        u_pot, u_grad, ratio = potential(u, beta)
        p0 = {k: noise.momentum[k].normal(t, v.dtype) for k, v in u.items()}
        h0 = u_pot + kinetic(p0)
        scale = {k: broadcast(eps, k, v) for k, v in u.items()}
        p = {k: p0[k] - 0.5 * scale[k] * u_grad[k] for k in u}
        q = dict(u)
        for step in range(leapfrog_steps):
            q = {k: q[k] + scale[k] * p[k] for k in q}
            q_pot, q_grad, q_ratio = potential(q, beta)
            factor = 1.0 if step < leapfrog_steps - 1 else 0.5
            p = {k: p[k] - factor * scale[k] * q_grad[k] for k in p}
        h1 = q_pot + kinetic(p)
        log_accept = (h0 - h1).nan_to_num(nan=-math.inf)
        accept = noise.accept.uniform(t, log_accept.dtype).log() < log_accept
        keep = {k: broadcast(accept, k, v) for k, v in u.items()}
        u = {k: torch.where(keep[k], q[k], u[k]) for k in u}
        u_pot = torch.where(accept, q_pot, u_pot)
        u_grad = {k: torch.where(keep[k], q_grad[k], u_grad[k]) for k in u}
        ratio = torch.where(accept, q_ratio, ratio)
        accepted += accept
        running = 0.9 * running + 0.1 * accept
        eps = (eps * torch.where(running > TARGET_ACCEPTANCE, 1.02, 0.98)).clamp(*STEP_SIZE_RANGE)
    return log_w, accepted / max(1, len(betas) - 1), eps, start_ratio, u


@takes_program_arguments
def annealed_evidence(
    model: Callable,
    guide: Callable,
    x: ProgramData,
    *,
    num_chains: int = 16,
    num_steps: int = 500,
    leapfrog_steps: int = 10,
    start: str = "guide",
    step_size: float = 0.01,
    batch_size: int | None = None,
    data_plate: str | None = None,
    progress: bool = False,
    train_mode: bool = False,
    seed: int | None = None,
    distributed: Distributed = SINGLE,
    check_fraction: float | None = 0.25,
) -> AnnealedEvidence:
    """AIS estimate of log p(x) for every data point of a pair of local latents; for a pair with
    global latents, of log p(x_1..N) of the whole data set (``unit == "data set"``, one value).

    :param num_chains: independent chains per data point (the estimate's log-mean-exp is over
        them).
    :param num_steps: intermediate distributions T (sigmoid schedule); each costs
        ``leapfrog_steps + 1`` evaluations of the pair and its gradient.
    :param start: ``"guide"`` (anneal from q(z | x); also gives the ELBO and the AIS gap; an
        autoguide's density is read through its auxiliary sites, ``guide_density``) or
        ``"prior"`` (from p(z): for guides without a density at an arbitrary z).
    :param batch_size: data points per pass; memory grows with ``num_chains * batch_size``
        (default: as many as keep that at evaluate's rows per chunk, 4096 on a CPU).
    :param train_mode: keep the pair's modules in training mode (else evaluation mode).
    :param seed: every draw of point n is keyed by (seed, n): its estimate is the same whatever
        the batch size and however many processes share the points (default: drawn from
        torch's stream, so ``pyro.set_rng_seed`` fixes it).
    :param distributed: under torchrun, each rank anneals its share of the points and every
        rank gets all of them back, in order (a data set's chains are annealed whole).
    :param check_fraction: whether AIS converged: as many chains again, with this fraction of
        the steps (their own draws), and their estimate set beside the full one
        (``convergence``; a note where the full one is higher beyond their SEs: it is still
        rising).  None: no check (the cost is this fraction of the run).
    """
    if check_fraction is not None and not 0 < check_fraction < 1:
        raise OptionError("check_fraction", f"must be between 0 and 1, or None; got "
                                            f"{check_fraction}")
    seed = distributed.common_seed(seed)
    settings = dict(num_chains=num_chains, leapfrog_steps=leapfrog_steps, start=start,
                    step_size=step_size, batch_size=batch_size, data_plate=data_plate,
                    progress=progress, train_mode=train_mode, distributed=distributed)
    full = _annealed(model, guide, x, stream_key(seed, "ais"), num_steps=num_steps, **settings)
    shorter_steps = max(1, round(num_steps * check_fraction)) if check_fraction else num_steps
    if shorter_steps < num_steps:
        shorter = _annealed(model, guide, x, stream_key(seed, "ais/shorter"),
                            num_steps=shorter_steps, **settings)
        full.convergence = convergence_check(full, shorter)
        if full.convergence["verdict"] != "converged":
            full.notes.append(full.convergence["reading"])
    return full


def _annealed(model: Callable, guide: Callable, x: ProgramData, key: int, *, num_chains: int,
              num_steps: int, leapfrog_steps: int, start: str, step_size: float,
              batch_size: int | None, data_plate: str, progress: bool, train_mode: bool,
              distributed: Distributed) -> AnnealedEvidence:
    """One AIS run of every point's chains, keyed by ``key``."""
    with evaluation_mode(model, guide, train_mode):
        batch_size, path = points_per_pass(model, guide, x, num_chains, start, data_plate,
                                           batch_size, "annealed_evidence", num_steps,
                                           leapfrog_steps, step_size)
        share = (distributed.shard(x.shape[0]) if path.layout.per_datapoint
                 else slice(0, x.shape[0]))
        local = None
        # The first batch's path serves where this rank's first batch is that batch.
        reuse = share.start == 0 and path.x.shape[0] == min(batch_size, share.stop)
        if share.stop > share.start:
            local = _anneal_points(
                model, guide, x[share], share.start, key, path if reuse else None,
                num_chains=num_chains, num_steps=num_steps, leapfrog_steps=leapfrog_steps,
                start=start, step_size=step_size, batch_size=batch_size, data_plate=data_plate,
                progress=progress and distributed.is_main)
    parts = (distributed.gather(local) if path.layout.per_datapoint and distributed.enabled
             else [local])
    return AnnealedEvidence.concatenate([p for p in parts if p is not None])


def _anneal_points(model: Callable, guide: Callable, x: ProgramData, first: int, key: int,
                   path: AnnealingPath | None, *, num_chains: int, num_steps: int,
                   leapfrog_steps: int, start: str, step_size: float, batch_size: int,
                   data_plate: str, progress: bool) -> AnnealedEvidence:
    """AIS on the points ``first ..`` of the call (``x``), ``batch_size`` at a time; ``path``:
    that of the first batch, where it is built already."""
    betas = sigmoid_schedule(num_steps)
    parts = []
    for s in range(0, x.shape[0], batch_size):
        xb = x[s: s + batch_size]
        if path is None or s > 0:
            path = annealing_path(model, guide, xb, num_chains, start, data_plate)
        u = path.initial_state(key, first + s)
        log_w, acceptance, eps, start_ratio, _ = anneal(
            path, u, betas, leapfrog_steps, step_size, progress,
            f"AIS {first + s}-{first + s + xb.shape[0]}", path.noise(key, first + s, u))
        parts.append((log_w.cpu(), acceptance.mean(0).cpu(), eps.mean(0).cpu(),
                      start_ratio.double().cpu()))
    log_w = torch.cat([p[0] for p in parts], 1)
    log_evidence, se = log_mean_exp_with_se(log_w)
    elbo = elbo_se = None
    if start == "guide":
        draws = torch.cat([p[3] for p in parts], 1)
        elbo = draws.mean(0)
        elbo_se = draws.std(0) / math.sqrt(num_chains) if num_chains > 1 else None
    return AnnealedEvidence(
        log_evidence=log_evidence, log_evidence_se=se, log_weights=log_w,
        acceptance=torch.cat([p[1] for p in parts]), step_size=torch.cat([p[2] for p in parts]),
        num_chains=num_chains, num_steps=num_steps, start=start, elbo=elbo, elbo_se=elbo_se,
        unit="data point" if path.layout.per_datapoint else "data set",
        notes=[path.note] if getattr(path, "note", None) else [], num_points=x.shape[0])


def annealing_path(model: Callable, guide: Callable, x: torch.Tensor, chains: int, start: str,
                   data_plate: str) -> AnnealingPath:
    """The pair checked for AIS and ready to evaluate log p(x, z), log base(z) and their
    gradients for ``chains`` chains per point of ``x``."""
    layout, supports = _check_pair(model, guide, x, start, data_plate)
    if layout.vectorized:
        return AnnealingPath(model, guide, x, layout, chains, start, data_plate, supports)
    path = VmappedPath(model, guide, x, layout, chains, start, data_plate, supports)
    reason = path.differs()
    if reason is None:
        return path
    path = ChainByChainPath(model, guide, x, layout, chains, start, data_plate, supports)
    path.note = (f"the pair does not broadcast over a leading particle dimension and vmap "
                 f"could not take it ({reason}): its chains were annealed one by one")
    return path


def points_per_pass(model: Callable, guide: Callable, x: torch.Tensor, chains: int,
                     start: str, data_plate: str, batch_size: int | None, caller: str,
                     num_steps: int, leapfrog_steps: int, step_size: float) -> tuple[int, AnnealingPath]:
    """The settings checked; the points annealed per pass (by default as many as keep chains x
    points at evaluate's rows per chunk; all of them for global latents, which tie the points
    together) and the path of the first pass."""
    for name, value in (("num_steps", num_steps), ("leapfrog_steps", leapfrog_steps)):
        if value < 1:
            raise OptionError(name, f"must be a positive integer, got {value}")
    if not 0 < step_size <= STEP_SIZE_RANGE[1]:
        raise OptionError("step_size", f"must be in (0, {STEP_SIZE_RANGE[1]}], got {step_size}")
    if batch_size is None:
        batch_size = max(1, default_rows_per_chunk(x.device) // chains)
    batch_size = checked_arguments(x, chains, batch_size, caller)
    first = annealing_path(model, guide, x[:batch_size], chains, start, data_plate)
    if not first.layout.per_datapoint and batch_size < x.shape[0]:
        batch_size = x.shape[0]
        first = annealing_path(model, guide, x, chains, start, data_plate)
    return batch_size, first


@takes_program_arguments
def ais_beside_importance(model: Callable, guide: Callable, x: ProgramData, *,
                          num_samples: int, num_chains: int = 16, num_steps: int = 500,
                          start: str = "guide", batch_size: int | None = None,
                          data_plate: str | None = None, progress: bool = False,
                          seed: int | None = None,
                          distributed: Distributed = SINGLE,
                          check_fraction: float | None = 0.25) -> dict:
    """AIS and importance sampling (K = ``num_samples``) on the same points: both summaries, the
    per-point difference AIS - IS, and per point both estimates with IS's k-hat.  ``seed``
    keys AIS (see ``annealed_evidence``); under torchrun both share the points out."""
    # Before importance sampling draws: its draws on a rank depend on the rank's share.
    seed = distributed.common_seed(seed)
    importance = evaluate(model, guide, x, num_samples=num_samples, batch_size=batch_size,
                          data_plate=data_plate, progress=progress and distributed.is_main,
                          distributed=distributed)
    ais = annealed_evidence(model, guide, x, num_chains=num_chains, num_steps=num_steps,
                            start=start, batch_size=batch_size, data_plate=data_plate,
                            progress=progress, seed=seed, distributed=distributed,
                            check_fraction=check_fraction)
    is_evidence = (importance.log_evidence if importance.unit == "data point" else
                   torch.tensor([importance.total.log_evidence], dtype=torch.float64))
    summary = importance.summary()
    if importance.unit != "data point":
        # One estimate of log p(x_1..N): the table reads it as its "mean".
        summary["log_evidence"] = {"mean": importance.total.log_evidence,
                                   "se": importance.total.log_evidence_se}
    ais_summary = ais.summary()
    if ais.elbo is None:
        # Chains started from the prior carry no ELBO; the guide's, from the draws of the
        # importance sampler on the same points, gives the AIS gap all the same.
        elbo = (importance.elbo if importance.unit == "data point"
                else torch.tensor([importance.total.elbo], dtype=torch.float64))
        ais_summary["elbo"] = mean_and_se(elbo)
        ais_summary["evidence_gap"] = mean_and_se(ais.log_evidence - elbo)
    difference = ais.log_evidence - is_evidence
    out = {
        "ais": ais_summary, "importance": summary,
        "ais_minus_is": mean_and_se(difference),
        "per_point": {"ais": ais.log_evidence.tolist(), "importance": is_evidence.tolist(),
                      # k-hat is undefined (NaN) with too few draws: null in JSON.
                      "khat": [None if math.isnan(k) else k for k in importance.khat.tolist()]},
    }
    high = importance.khat.cpu() > KHAT_UNRELIABLE
    if importance.unit == "data point" and int(high.sum()) >= 2:
        out["where_khat_high"] = agreement_where_khat_high(difference.cpu()[high])
    return out


def agreement_where_khat_high(difference: torch.Tensor) -> dict:
    """AIS - importance sampling on the points whose k-hat is > 0.7, and what it says of
    k-hat's warning there: AIS converges whatever the weights' tail, so agreement within Monte
    Carlo error says k-hat overstated the problem, AIS above says it did not."""
    entry = {"num_points": int(difference.shape[0]), **mean_and_se(difference)}
    mean, se = entry["mean"], entry["se"] or 0.0
    where = f"on the {counted(entry['num_points'], 'point')} with k-hat > {KHAT_UNRELIABLE}, "
    if abs(mean) <= 2 * se:
        reading = (f"AIS agrees with importance sampling ({mean:+.3f} ± {se:.3f}): there k-hat "
                   "overstated the problem")
    elif mean > 0:
        reading = (f"AIS is higher by {mean:.3f} ± {se:.3f}: importance sampling underestimates "
                   "log p(x) there, as k-hat warned")
    else:
        reading = (f"AIS is lower by {-mean:.3f} ± {se:.3f}: AIS has not converged there (more "
                   "steps), so neither estimate settles them")
    entry["reading"] = where + reading
    return entry
