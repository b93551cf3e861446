"""ELBO, KL to the prior, importance-sampled evidence and the evidence gap, per data point or for
the whole data set.

For each data point x_n and K draws z_k ~ q(z | x_n) (the guide), with
log-weights  w_k = log p(x_n, z_k) - log q(z_k | x_n):

* ``reconstruction`` = E_q[log p(x_n | z)]            (the plain Monte Carlo mean over k of the
                                                        model's observed sites, with its SE)
* ``kl_prior``       = KL(q(z | x_n) || p(z))          (analytic per latent site where known)
* ``elbo``           = reconstruction - kl_prior
* ``log_evidence``   = log (1/K) sum_k exp(w_k)        (importance sampling, q as proposal)
* ``evidence_gap``   = log_evidence - elbo             (estimates KL(q(z | x_n) || p(z | x_n)))

A pair with global latent variables (sites outside the data plate) has no per-point evidence:
its unit is the data set, with one joint weight per draw of (theta, z_1..N),
w_k = log p(x_1..N, theta_k, z_k) - log q(theta_k, z_k | x_1..N), exactly the setting of Yao,
Vehtari, Simpson & Gelman (2018).  ``Diagnostics.total`` holds the data set's numbers for every
pair (for a pair of local latents only, the sums of the per-point ones).

Both walk the data differently (``passes``) and add up the same per-particle terms (``terms``)
in the same way (``_Sums``): per data point the rows are the points, for a data set one row.

The ELBO uses the sampled KL, log q(z_k) - log p(z_k), as a control variate for the
reconstruction term (from 20 draws on): with a perfect guide the log-weights are constant and
the ELBO, and so the gap, come out exact instead of carrying the reconstruction's sampling noise.
Its mean is zero because every closed-form KL is one the guide's order makes valid
(``PairLayout.closed_form``; the others are Monte Carlo, and add nothing to it).  So the ELBO
and the reconstruction minus the KL agree within their Monte Carlo errors, not to the digit.

The pair's modules are in evaluation mode throughout (``train_mode`` keeps training mode), and
what the numbers leave out is said in ``notes``: sites whose KL is Monte Carlo because of the
guide's order, the guide's observed sites and factors (no part of q), sites with a scale of the
user's (the density is evaluated unscaled).

All in nats.  ``log_evidence`` is a stochastic lower bound on log p(x) whose bias shrinks as K
grows (Burda et al. 2016), so ``evidence_gap`` is an underestimate of the true gap for small K.
Standard errors are Monte Carlo errors over the K draws (delta method for the log of a mean).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..foundations.conventions import inspect_pair
from ..foundations.data_plate import takes_program_arguments
from ..foundations.device import move_pair, resolve_device
from ..foundations.device import rows_per_chunk as default_rows_per_chunk
from ..foundations.distributed import SINGLE, Distributed
from ..foundations.errors import ConventionError
from ..foundations.full_plates import widened_note
from ..foundations.module_mode import evaluation_mode
from ..foundations.pair_layout import PairLayout
from ..foundations.program_data import ProgramData
from ..foundations.progress import tqdm
from ..foundations.weight_moments import WeightMoments
from ..foundations.wording import counted
from .compiled_pass import CompiledPass
from .defensive import MixtureSums, check_defensive, defensive_note, prior_draws, prior_particles
from .discrete_guide import discrete_note, enumerated_particles, enumerates
from .non_finite import refuse_non_finite
from .passes import (
    batches,
    checked_arguments,
    first_layout,
    joint_chunks,
    pass_layout,
    vectorization_notes,
)
from .results import DATA_SET, DataSetTotals, Diagnostics, concatenate, first_points, on_cpu
from .surgery import elbo_surgery
from .symmetry import find_symmetry, mode_averaged, symmetry_note
from .terms import KLTerm, ParticleTerms


@takes_program_arguments
def evaluate(
    model: Callable,
    guide: Callable,
    x: ProgramData,
    *,
    num_samples: int,
    batch_size: int | None = None,
    data_plate: str | None = None,
    rows_per_chunk: int | None = None,
    keep_log_weights: bool = False,
    progress: bool = False,
    distributed: Distributed = SINGLE,
    device: str | torch.device | None = None,
    surgery: bool = False,
    train_mode: bool = False,
    defensive: float = 0.0,
    compiled: bool | None = None,
) -> Diagnostics:
    """Diagnose the guide of any model/guide pair that follows the conventions.

    :param x: data, first dimension indexing the N data points.  For a pair with global
        latents, the data the guide was fitted to: its evidence gap is about those.
    :param num_samples: K, draws from the guide per data point (per data set with global
        latents).
    :param batch_size: data points per pass (all at once when None).  Batches may hold
        different latent sites (sequences of different lengths): a site a point lacks
        contributes nothing to it.  With global latents every batch shares the same K draws
        of the global sites.
    :param data_plate: name of the plate that indexes data points in model and guide.
    :param rows_per_chunk: particles x data points evaluated at once; memory stays bounded in K
        (default: 4096 on a CPU, 65 536 on a GPU).
    :param keep_log_weights: also return the ``[K, N]`` importance log-weights (``[K, 1]``,
        the joint weights, with global latents).
    :param distributed: under torchrun, each rank evaluates its share of the points and every
        rank gets all of them back, in their original order.  (A pair with global latents is
        evaluated whole on every rank: its weights do not split over points.)
    :param device: where to compute (``"cuda"``, ``"cuda:1"``, ``"auto"``; default: where x
        is); the pair's parameters are moved there.  The returned tensors are on the CPU.
    :param surgery: also split the mean KL to the prior into the mutual information I_q(x; z)
        and KL(q(z) || p(z)) (``summary()["elbo_surgery"]``; O(N^2) in the points).
    :param train_mode: keep the pair's modules in training mode (Dropout drawing, BatchNorm
        on batch statistics) instead of evaluation mode.
    :param defensive: the prior's share of the proposal of log p(x) (``diagnostics.defensive``):
        beside the K draws from q, K a / (1 - a) from p(z), every one weighted against the
        mixture; a second opinion where q may miss a mode, which k-hat cannot see.  0: none.
    :param compiled: compute the particles' terms with a compiled pass (``compiled_pass``),
        checked against the eager pass on its first chunks: None (default) where the eager
        pass would take over a minute, True wherever the pair allows it, False never.
    """
    batch_size = checked_arguments(x, num_samples, batch_size, "evaluate")
    if device is not None:
        device = resolve_device(device)
        x = x.to(device)
        move_pair(model, guide, device)
    rows_per_chunk = rows_per_chunk or default_rows_per_chunk(x.device)
    with evaluation_mode(model, guide, train_mode) as mode_notes:
        verified: set = set()  # batch shapes whose particles were found to replay alike
        with torch.no_grad():
            # A single particle is drawn in no plate: nothing to verify of vectorizing.
            first, batch_size = first_layout(model, guide, x, batch_size, data_plate, verified,
                                             replay_particles=num_samples > 1)
        check_defensive(defensive, first)
        if distributed.enabled and first.per_datapoint:
            d = _evaluate_shared(model, guide, x, num_samples, batch_size, data_plate,
                                 rows_per_chunk, keep_log_weights, progress, distributed,
                                 train_mode, defensive, compiled)
        else:
            with torch.no_grad():
                if first.per_datapoint:
                    d = _per_data_point(model, guide, x, first, num_samples, batch_size,
                                        data_plate, rows_per_chunk, keep_log_weights, progress,
                                        defensive, verified, CompiledPass(data_plate, compiled))
                else:
                    d = _per_data_set(model, guide, x, first, num_samples, batch_size,
                                      data_plate, rows_per_chunk, keep_log_weights, progress,
                                      defensive, verified)
        refuse_non_finite(model, guide, x, d, first)
        if num_samples < 2:
            _refuse_gap_of_one_draw(d)
        if defensive:
            d.notes.append(defensive_note(defensive, num_samples))
            d.proposal_draws = num_samples + prior_draws(num_samples, defensive)
        d.observed, d.conditional = first.observed_names, first.conditional
        # Summed over discrete guide values a reconstruction may be exact: an SE of 0 then
        # says nothing of whether the observations depend on the latents.
        if num_samples > 1 and not enumerates(first) and _observations_ignore_latents(d):
            d.notes.append(IGNORED_LATENTS)
        d.notes.extend(note for note in mode_notes + layout_notes(first, d)
                       if note not in d.notes)
        if x.widened:
            d.notes.append(widened_note(x.widened))
        if not first.per_datapoint and num_samples > 1:
            _mirror_modes(model, guide, x, first, data_plate, d)
        if surgery:
            d.elbo_surgery = elbo_surgery(model, guide, x, num_samples=min(num_samples, 10),
                                          data_plate=data_plate).summary()
    return on_cpu(d)


# Draws of the mode-averaged estimate at most (each scores q at every permutation): in the
# particle plate or under vmap, and for a pair taken particle by particle.
MODE_AVERAGED_DRAWS = 1000, 250


def _mirror_modes(model: Callable, guide: Callable, x: ProgramData, layout: PairLayout,
                  data_plate: str | None, d: Diagnostics) -> None:
    """Where the program's components are exchangeable, say so in ``d`` with the log K! bound
    and the mode-averaged estimate (``symmetry``)."""
    symmetry = find_symmetry(model, guide, x, layout, data_plate)
    if symmetry is None:
        return
    with torch.no_grad():
        result = mode_averaged(model, guide, x, layout, symmetry,
                               min(d.num_samples, MODE_AVERAGED_DRAWS[
                                   not (layout.vectorized or layout.vmap)]))
    d.notes.append(symmetry_note(symmetry, result, d.total.log_evidence))
    d.mirror_modes = {"plate": symmetry.plate, "components": symmetry.size,
                      "mirror_modes": symmetry.mirror_modes,
                      "log_bound": math.lgamma(symmetry.size + 1),
                      "mode_averaged": None if isinstance(result, str) else result.as_dict(),
                      "reason": result if isinstance(result, str) else None}


ONE_DRAW = ("K = 1: no evidence gap (nor its SE): log p(x) from one draw is that draw's "
            "log-weight, a one-draw ELBO itself, and its difference from the ELBO is noise "
            "about 0; the gap needs K >= 2, and many more draws to be tight")


def _refuse_gap_of_one_draw(d: Diagnostics) -> None:
    """With one draw the gap is no estimate: NaN (null in the files, "not a number" in the
    tables), with ``ONE_DRAW`` in the notes."""
    if d.evidence_gap is not None:
        d.evidence_gap = torch.full_like(d.evidence_gap, torch.nan)
        d.evidence_gap_se = torch.full_like(d.evidence_gap_se, torch.nan)
    d.total.evidence_gap, d.total.evidence_gap_se = float("nan"), None
    d.notes.append(ONE_DRAW)


IGNORED_LATENTS = (
    "the observed sites' log-density is the same at every draw of the latents: they depend on "
    "none of them, so the posterior is the prior, log p(x) is the likelihood itself and the "
    "gap is the KL to the prior (Pyro's VariationalGP and VariationalSparseGP write q's "
    "moments into their likelihood: these are that program's numbers, not a GP's marginal "
    "likelihood)")


def _observations_ignore_latents(d: Diagnostics) -> bool:
    se = d.total.reconstruction_se if d.total is not None else None
    if se is None and d.reconstruction_se is not None:
        se = float(d.reconstruction_se.abs().max())
    return se == 0.0


def layout_notes(layout: PairLayout, d: Diagnostics) -> list[str]:
    """What the numbers of ``d`` leave out or how they were computed, read off the layout:
    sites whose KL could not be taken in closed form, the guide's observed sites, scales."""
    notes = []
    order = [name for name in layout.latent
             if name not in layout.closed_form and name not in layout.discrete_guide]
    if order:
        notes.append(f"the KL of site(s) {order} is Monte Carlo: the guide draws a site the "
                     "model samples before them (a possible parent of their prior) after them, "
                     "so a closed form would not be their expected log q - log p")
    if layout.guide_observed:
        mean = "" if d.guide_observed is None else (
            f"; their log-density is {d.guide_observed.double().mean().item():.3f} nats per "
            "point on average, which Pyro's Trace_ELBO subtracts from the ELBO")
        notes.append(f"guide site(s) {list(layout.guide_observed)} are observed or factors: no "
                     f"part of q, left out of log q, the ELBO and the evidence here{mean}")
    if layout.summed_out:
        notes.append(f"discrete site(s) {list(layout.summed_out)} of the model are summed out "
                     "exactly (enumerated, as TraceEnum_ELBO does): log p(x, z) marginalizes "
                     "them, and the draws, weights and k-hat are of the continuous latents")
    if layout.masks_changed:
        notes.append(f"the mask of site(s) {list(layout.masks_changed)} changed after they were "
                     "drawn (a mask tensor updated in place, as `mask |= ...` in a loop): "
                     "log-densities are read after the program has run, by Pyro's ELBOs and "
                     "here alike, so those sites are scored with the mask's final value, not "
                     "the one in force when they were drawn")
    if (discrete := discrete_note(layout)) is not None:
        notes.append(discrete)
    if layout.scaled:
        notes.append(f"site(s) {list(layout.scaled)} carry a scale of their own "
                     "(poutine.scale): every number here is of the unscaled densities, "
                     "log p(x, z) and log q(z | x) as the distributions define them, not of the "
                     "scaled objective SVI optimizes")
    return notes


def _evaluate_shared(model, guide, x, num_samples, batch_size, data_plate, rows_per_chunk,
                     keep_log_weights, progress, distributed: Distributed,
                     train_mode: bool, defensive: float, compiled: bool | None) -> Diagnostics:
    """Each rank evaluates its share of the points; every rank gets all of them, in order."""
    share = x[distributed.shard(x.shape[0])]
    local = None
    if share.shape[0]:
        local = evaluate(model, guide, share, num_samples=num_samples, batch_size=batch_size,
                         data_plate=data_plate, rows_per_chunk=rows_per_chunk,
                         keep_log_weights=keep_log_weights, progress=progress,
                         train_mode=train_mode, defensive=defensive, compiled=compiled)
    parts = [d for d in distributed.gather(local) if d is not None]
    return concatenate(parts, num_samples)


class _Sums:
    """An estimate's particles, added chunk by chunk and reduced as they come, so that memory
    stays bounded in K (``elbogap.foundations.weight_moments``): the moments and tail of the
    log-weights and of the per-particle ELBO terms, and summed over particles the KL of each
    unit ``[rows, D]``, E_q[z | x] ``[rows, D]`` and the guide's observed term.  Rows are data
    points, or the one row of a data set.  The log-weights themselves only if kept."""

    def __init__(self, num_samples: int, keep_log_weights: bool = False):
        self.num_samples = num_samples
        self.moments = WeightMoments(num_samples, keep_log_weights)
        self.guide_observed: torch.Tensor | None = None
        self.kl: dict[str, torch.Tensor] = {}
        self.kl_method: dict[str, str] = {}
        self.latent_mean: dict[str, torch.Tensor] = {}

    def add(self, log_w: torch.Tensor, reconstruction: torch.Tensor, kl: dict[str, KLTerm],
            latent_mean: dict[str, torch.Tensor] | None = None,
            guide_observed: torch.Tensor | None = None,
            elbo_log_weight: torch.Tensor | None = None) -> None:
        kl_total = torch.zeros_like(log_w)
        for name, term in kl.items():
            summed = term.value.sum(0)
            self.kl[name] = summed if name not in self.kl else self.kl[name] + summed
            self.kl_method[name] = term.method
            kl_total = kl_total + term.value.sum(-1)
        self.moments.add(log_w, reconstruction - kl_total, reconstruction, elbo_log_weight)
        if guide_observed is not None:
            summed = guide_observed.sum(0)
            self.guide_observed = (summed if self.guide_observed is None
                                   else self.guide_observed + summed)
        for name, m in (latent_mean or {}).items():
            summed = m.sum(0)
            self.latent_mean[name] = summed if name not in self.latent_mean \
                else self.latent_mean[name] + summed

    def estimate(self, rows: int) -> Diagnostics:
        """Every estimate of the rows, from all ``num_samples`` particles."""
        k, moments = self.num_samples, self.moments
        kl_per_dim = {name: s / k for name, s in self.kl.items()}
        kl_sites = {name: v.sum(1) for name, v in kl_per_dim.items()}
        kl_prior = (sum(kl_sites.values()) if kl_sites
                    else torch.zeros(rows, dtype=torch.float64))
        elbo = moments.elbo()
        reconstruction, reconstruction_se = moments.reconstruction()
        log_evidence = moments.log_mean_exp()
        return Diagnostics(
            elbo=elbo["elbo"], elbo_se=elbo["elbo_se"], reconstruction=reconstruction,
            reconstruction_se=reconstruction_se, kl_prior=kl_prior, log_evidence=log_evidence,
            log_evidence_se=moments.log_mean_exp_se(),
            evidence_gap=log_evidence - elbo["elbo"], evidence_gap_se=elbo["evidence_gap_se"],
            kl_sites=kl_sites, kl_per_dim=kl_per_dim, kl_method=dict(self.kl_method),
            khat=moments.khat(), ess=moments.ess(),
            latent_mean={name: s / k for name, s in self.latent_mean.items()},
            num_samples=k,
            log_weights=moments.log_weights(),
            guide_observed=(self.guide_observed / k if self.guide_observed is not None
                            else None))


def _per_data_point(model: Callable, guide: Callable, x: torch.Tensor, first: PairLayout,
                    num_samples: int, batch_size: int, data_plate: str, rows_per_chunk: int,
                    keep_log_weights: bool, progress: bool, defensive: float,
                    verified: set, compiled: CompiledPass) -> Diagnostics:
    """Every batch of points with its own K draws, ``rows_per_chunk`` particles x points at a
    time (by ``compiled``'s pass)."""
    if first.subsample is None:
        per_chunk = max(1, rows_per_chunk // first.rows(x[:batch_size]))
        compiled.expect(x[:batch_size], per_chunk,
                        (x.shape[0] // batch_size) * (num_samples // per_chunk))
    if progress:
        # Only then: fit evaluates every epoch, and a Ctrl-C that lands in a finished bar's
        # __del__ is printed and dropped by Python instead of stopping the run.  It counts
        # draws (points x K): one batch of a large K is long.
        bar = tqdm(total=x.shape[0] * num_samples, desc="evaluate", unit="draw",
                   unit_scale=True)
    parts = []
    for b in batches(model, guide, x, batch_size, first, data_plate):
        layout = (first if b.start == 0
                  else pass_layout(b.model, b.guide, b.x, data_plate, verified,
                                   replay_particles=num_samples > 1))
        if not layout.per_datapoint:
            raise ConventionError(
                f"sites {list(layout.global_sites)} are outside plate '{data_plate}' in the "
                f"batch from row {b.start}: a pair's global latents must be the same in "
                "every batch"
            )
        sums, rows = _Sums(num_samples, keep_log_weights), layout.rows(b.x)
        mixture = (MixtureSums(defensive, num_samples, keep_log_weights) if defensive
                   else None)
        particles_per_chunk = max(1, rows_per_chunk // rows)
        for done in range(0, num_samples, particles_per_chunk):
            k = min(particles_per_chunk, num_samples - done)
            terms = (enumerated_particles(b.model, b.guide, b.x, layout, k, data_plate)
                     if enumerates(layout)
                     else compiled.particles(b.model, b.guide, b.x, layout, k))
            sums.add(terms.log_weight, terms.reconstruction, terms.kl, terms.latent_mean,
                     terms.guide_observed if layout.guide_observed else None,
                     terms.elbo_log_weight)
            if mixture is not None:
                mixture.add(terms.log_weight, terms.log_q, terms.log_prior)
            if progress:
                bar.update(k * b.keep)
        part = sums.estimate(rows)
        if mixture is not None:
            k_p = prior_draws(num_samples, defensive)
            for done in range(0, k_p, particles_per_chunk):
                terms = prior_particles(b.model, b.guide, b.x, layout,
                                        min(particles_per_chunk, k_p - done), data_plate)
                mixture.add(terms.log_weight, terms.log_q, terms.log_prior)
            part = mixture.apply(part)
        parts.append(first_points(part, b.keep))
    if progress:
        bar.close()
    d = concatenate(parts, num_samples)
    d.notes.extend(vectorization_notes(first))
    if compiled.note() is not None:
        d.notes.append(compiled.note())
    return d


def _per_data_set(model: Callable, guide: Callable, x: torch.Tensor, first: PairLayout,
                  num_samples: int, batch_size: int, data_plate: str, rows_per_chunk: int,
                  keep_log_weights: bool, progress: bool, defensive: float,
                  verified: set) -> Diagnostics:
    """Joint importance sampling over every latent variable of the data set: each draw of the
    global sites is shared by every batch, and its weight sums the whole data set."""
    n = x.shape[0]
    sums = _Sums(num_samples, keep_log_weights)
    mixture = MixtureSums(defensive, num_samples, keep_log_weights) if defensive else None
    for k, chunk in joint_chunks(model, guide, x, first, batch_size, num_samples, data_plate,
                                 rows_per_chunk, progress):
        log_w = torch.zeros(k, dtype=torch.float64)
        recon = torch.zeros(k, dtype=torch.float64)
        guide_obs = torch.zeros(k, dtype=torch.float64)
        log_q, log_prior = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
        kl: dict[str, KLTerm] = {}
        for s, layout, terms in chunk:
            if s == 0:
                log_w = log_w + terms.global_log_weight
                recon = recon + terms.global_reconstruction
                guide_obs = guide_obs + terms.global_guide_observed
                log_q, log_prior = log_q + terms.global_log_q, log_prior + _global_prior(terms)
            log_w = log_w + terms.log_weight.sum(1)
            recon = recon + terms.reconstruction.sum(1)
            guide_obs = guide_obs + terms.guide_observed.sum(1)
            log_q, log_prior = log_q + terms.log_q.sum(1), log_prior + terms.log_prior.sum(1)
            for name, term in terms.kl.items():
                if term.value.shape[1] == 1 and s != 0 and _is_global_unit(name, layout):
                    continue  # a global site's KL counts once
                summed = term.value.sum(1, keepdim=True)
                kl[name] = KLTerm(summed if name not in kl else kl[name].value + summed,
                                  term.method)
        sums.add(log_w.unsqueeze(1), recon.unsqueeze(1), kl,
                 guide_observed=guide_obs.unsqueeze(1) if first.guide_observed else None)
        if mixture is not None:
            mixture.add(log_w.unsqueeze(1), log_q.unsqueeze(1), log_prior.unsqueeze(1))
    whole = sums.estimate(1)
    if mixture is not None:
        # The prior's draws of the global sites must meet every point: one pass over x.
        layout = first if batch_size >= n else inspect_pair(model, guide, x, data_plate)
        k_p, per_chunk = prior_draws(num_samples, defensive), max(1, rows_per_chunk // n)
        for done in range(0, k_p, per_chunk):
            terms = prior_particles(model, guide, x, layout, min(per_chunk, k_p - done),
                                    data_plate)
            mixture.add(
                (terms.global_log_weight + terms.log_weight.sum(1)).unsqueeze(1),
                (terms.global_log_q + terms.log_q.sum(1)).unsqueeze(1),
                (_global_prior(terms) + terms.log_prior.sum(1)).unsqueeze(1))
        whole = mixture.apply(whole)
    elbo, kl_prior = float(whole.elbo[0]), float(whole.kl_prior[0])
    total = DataSetTotals(
        num_data=n, elbo=elbo, elbo_se=float(whole.elbo_se[0]),
        reconstruction=float(whole.reconstruction[0]),
        reconstruction_se=float(whole.reconstruction_se[0]), kl_prior=kl_prior,
        log_evidence=float(whole.log_evidence[0]),
        log_evidence_se=float(whole.log_evidence_se[0]),
        evidence_gap=float(whole.log_evidence[0]) - elbo,
        evidence_gap_se=float(whole.evidence_gap_se[0]),
        khat=float(whole.khat[0]), ess=float(whole.ess[0]),
    )
    return Diagnostics(
        elbo=None, elbo_se=None, reconstruction=None, kl_prior=None, log_evidence=None,
        log_evidence_se=None, evidence_gap=None, evidence_gap_se=None,
        kl_sites=whole.kl_sites, kl_per_dim=whole.kl_per_dim, kl_method=whole.kl_method,
        khat=whole.khat, ess=whole.ess, latent_mean={}, num_samples=num_samples, total=total,
        unit=DATA_SET, notes=vectorization_notes(first) + [_global_note(first, n, data_plate)],
        log_weights=whole.log_weights, guide_observed=whole.guide_observed,
    )


def _global_prior(terms: ParticleTerms) -> torch.Tensor:
    """log p(theta_k) of the latent sites outside the data plate."""
    return terms.global_log_weight - terms.global_reconstruction + terms.global_log_q


def _global_note(layout: PairLayout, n: int, data_plate: str | None) -> str:
    if data_plate is None:
        return ("no data plate (no vectorized plate around the model's observed sites indexes "
                "the rows of an argument; a sequential `for i in pyro.plate(...)` is none): the "
                "data are one observation, the unit is the data set, one joint importance "
                "weight per draw")
    latent = [name for name in layout.global_sites if name in layout.latent]
    why = (f"global latent variables {latent}" if latent else
           f"guide site(s) {[g for g in layout.global_sites if g not in layout.observed]} "
           "outside the data plate draw(s) the latents of all points jointly")
    if not latent and any(name in layout.observed for name in layout.global_sites):
        why = "no data plate: the model observes x as one whole"
    return f"{why}: the unit is the data set ({counted(n, 'point')}), one joint importance weight per draw"


def _is_global_unit(name: str, layout: PairLayout) -> bool:
    return any(part in layout.global_sites for part in name.split(" + "))
