"""ELBO, KL to the prior, importance-sampled evidence and the evidence gap, per data point or for
the whole data set.

For each data point x_n and K draws z_k ~ q(z | x_n) (the guide), with
log-weights  w_k = log p(x_n, z_k) - log q(z_k | x_n):

* ``reconstruction`` = E_q[log p(x_n | z)]            (Monte Carlo over k, all observed sites)
* ``kl_prior``       = KL(q(z | x_n) || p(z))          (analytic per latent site where known)
* ``elbo``           = reconstruction - kl_prior
* ``log_evidence``   = log (1/K) sum_k exp(w_k)        (importance sampling, q as proposal)
* ``evidence_gap``   = log_evidence - elbo             (estimates KL(q(z | x_n) || p(z | x_n)))

A pair with global latent variables (sites outside the data plate) has no per-point evidence:
its unit is the data set, with one joint weight per draw of (theta, z_1..N),
w_k = log p(x_1..N, theta_k, z_k) - log q(theta_k, z_k | x_1..N), exactly the setting of Yao,
Vehtari, Simpson & Gelman (2018).  ``Diagnostics.total`` holds the data set's numbers for every
pair (for a pair of local latents only, the sums of the per-point ones).

The Monte Carlo part uses the sampled KL, log q(z_k) - log p(z_k), as a control variate for
the reconstruction term (from 20 draws on): with a perfect guide the log-weights are constant and
the ELBO, and so the gap, come out exact instead of carrying the reconstruction's sampling noise.

All in nats.  ``log_evidence`` is a stochastic lower bound on log p(x) whose bias shrinks as K
grows (Burda et al. 2016), so ``evidence_gap`` is an underestimate of the true gap for small K.
Standard errors are Monte Carlo errors over the K draws (delta method for the log of a mean).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import pyro
import torch
from torch.distributions import biject_to, transforms
from tqdm.auto import tqdm

from inference.diagnostics.kl import MONTE_CARLO, SiteKL, kl_to_prior
from inference.diagnostics.psis import importance_ess, khat_summary, pareto_khat
from inference.diagnostics.traces import (
    FixedSubsample,
    PairLayout,
    apply_mask,
    data_frame,
    datapoint_rows,
    global_part,
    inspect_pair,
    is_point_mass,
    per_datapoint,
    sample_sites,
    site_log_prob,
    trace_pair,
)
from inference.errors import ConfigError, ConventionError
from inference.training.cpu import reuse_freed_memory_once
from inference.training.device import move_pair, resolve_device
from inference.training.device import rows_per_chunk as default_rows_per_chunk
from inference.training.distributed import SINGLE, Distributed

# Burda et al. (2016): a latent dimension is active when Cov_x(E_q[z_d | x]) exceeds this.
ACTIVE_UNIT_THRESHOLD = 0.01
# PSIS fits the largest ceil(min(K/5, 3 sqrt(K))) weights and needs at least 5 of them (ArviZ
# returns +inf below that): from K = 25 on there is a tail to fit.
MIN_SAMPLES_KHAT = 25

# Rows (particles x data points) pushed through the pair at once: bounds memory for any K. 4096
# keeps the intermediates of a 784-pixel decoder (12 MiB each) near the caches: measured 12 us per
# row against 20 us at 32768, and below 2048 the per-pass Python cost of Pyro shows.

# Below this many draws the ELBO uses the analytic KL alone (see _with_control_variate).
MIN_SAMPLES_CONTROL_VARIATE = 20

PER_DATAPOINT_FIELDS = (
    "elbo",
    "reconstruction",
    "kl_prior",
    "log_evidence",
    "evidence_gap",
)

DATA_POINT = "data point"
DATA_SET = "data set"


@dataclass
class DataSetTotals:
    """The data set's numbers, in nats (sums over points for a pair of local latents)."""

    num_data: int
    elbo: float
    elbo_se: float | None
    reconstruction: float
    kl_prior: float
    log_evidence: float
    log_evidence_se: float | None
    evidence_gap: float
    evidence_gap_se: float | None
    # One k-hat and ESS of the joint weights (global latents); per point otherwise (None here).
    khat: float | None = None
    ess: float | None = None

    def as_dict(self) -> dict:
        return {k: (_finite_or_none(v) if isinstance(v, float) else v)
                for k, v in asdict(self).items()}


@dataclass
class Diagnostics:
    """Diagnostics of a guide on a data set.

    For a pair of local latents every tensor of shape ``[N]`` is per data point, in nats.  For a
    pair with global latents (``unit == "data set"``) the per-point fields are None, and
    ``khat``/``ess``/``log_weights`` are those of the joint weights (one "point": the data set).
    """

    elbo: torch.Tensor | None
    elbo_se: torch.Tensor | None
    reconstruction: torch.Tensor | None
    kl_prior: torch.Tensor | None
    log_evidence: torch.Tensor | None
    log_evidence_se: torch.Tensor | None
    evidence_gap: torch.Tensor | None
    evidence_gap_se: torch.Tensor | None
    kl_sites: dict[str, torch.Tensor]
    kl_per_dim: dict[str, torch.Tensor]
    kl_method: dict[str, str]
    khat: torch.Tensor
    ess: torch.Tensor
    latent_mean: dict[str, torch.Tensor]
    num_samples: int
    total: DataSetTotals | None = None
    unit: str = DATA_POINT
    notes: list[str] = field(default_factory=list)
    log_weights: torch.Tensor | None = field(default=None, repr=False)
    # The model's observed sites, and whether they hold only part of x (a conditional model,
    # whose evidence is log p(y | inputs)): the tables' labels say which.
    observed: tuple[str, ...] = ("x",)
    conditional: bool = False
    # ELBO surgery's summary (inference.diagnostics.surgery), when evaluate computed it.
    elbo_surgery: dict | None = None

    def __repr__(self) -> str:
        from inference.outputs.table import format_summary

        return format_summary(self.summary())

    def _repr_html_(self) -> str:
        from inference.outputs.table import summary_html

        return summary_html(self.summary())

    def plot_kl_per_dim(self):
        """A matplotlib figure: the mean KL to the prior of every latent dimension."""
        from inference.outputs.plotting import plot_kl_per_dim

        return plot_kl_per_dim(self.summary()["kl_per_dim"])

    def plot_khat(self):
        """A matplotlib figure: the histogram of the importance weights' Pareto k-hat."""
        from inference.outputs.plotting import plot_khat_histogram

        return plot_khat_histogram(self.khat.numpy())

    def active_units(self, threshold: float = ACTIVE_UNIT_THRESHOLD) -> dict[str, torch.Tensor]:
        """Per latent site, which dimensions have Cov_x(E_q[z_d | x]) > threshold."""
        return {name: _nan_var(m) > threshold for name, m in self.latent_mean.items()}

    @property
    def num_data(self) -> int:
        return self.total.num_data

    def summary(self) -> dict:
        """Dataset means, each with the standard error of the mean over data points; for a
        pair with global latents, the data set's totals."""
        out: dict = {"unit": self.unit, "num_data": self.num_data,
                     "num_samples": self.num_samples, "total": self.total.as_dict(),
                     "observed": list(self.observed), "conditional": self.conditional}
        if self.unit == DATA_POINT:
            for name in PER_DATAPOINT_FIELDS:
                out[name] = mean_and_se(getattr(self, name))
            # Monte Carlo error of the dataset means (independent across points): what
            # separates an estimate from the exact value on the same points.
            n = self.num_data
            out["log_evidence_mc_se"] = _finite_or_none(self.log_evidence_se.mean().item())
            out["evidence_gap_mc_se"] = _finite_or_none(
                self.evidence_gap_se.double().pow(2).sum().sqrt().item() / n
            )
            out["kl_sites"] = {
                name: {**mean_and_se(value), "method": self.kl_method[name]}
                for name, value in self.kl_sites.items()
            }
            out["kl_per_dim"] = {
                name: [float(v) for v in value.nanmean(0)] for name, value in self.kl_per_dim.items()
            }
        else:
            out["kl_sites"] = {
                name: {"mean": float(value.sum()), "se": None, "method": self.kl_method[name]}
                for name, value in self.kl_sites.items()
            }
            out["kl_per_dim"] = {
                name: [float(v) for v in value.sum(0)] for name, value in self.kl_per_dim.items()
            }
        if self.num_samples >= MIN_SAMPLES_KHAT:
            out["khat"] = khat_summary(self.khat, self.unit)
        out["ess"] = {"mean": float(self.ess.mean()), "min": float(self.ess.min())}
        out["active_units"] = active_units_summary(self)
        out["notes"] = list(self.notes)
        if self.elbo_surgery is not None:
            out["elbo_surgery"] = self.elbo_surgery
        return out


def _nan_var(m: torch.Tensor) -> torch.Tensor:
    """Variance over data points (dim 0) of values that are NaN where a point lacks the site."""
    centred = m - m.nanmean(0)
    return centred.pow(2).nanmean(0)


def active_units_summary(d: Diagnostics) -> dict:
    """Active dimensions per site and a warning when most are not (posterior collapse)."""
    if d.unit != DATA_POINT or d.num_data < 2 or not d.latent_mean:
        return {"sites": {}, "active": None, "total": None, "warning": None}
    active = d.active_units()
    variances = {name: _nan_var(m) for name, m in d.latent_mean.items()}
    total = sum(int(a.numel()) for a in active.values())
    count = sum(int(a.sum()) for a in active.values())
    warning = None
    if count * 2 < total:
        warning = (
            f"posterior collapse: only {count} of {total} latent dimensions are active "
            f"(Cov_x(E_q[z]) > {ACTIVE_UNIT_THRESHOLD}); the rest carry no information about x"
        )
    return {
        "sites": {
            name: {"active": int(active[name].sum()), "total": int(active[name].numel()),
                   "variance": [float(v) for v in variances[name]]}
            for name in active
        },
        "active": count,
        "total": total,
        "warning": warning,
    }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def mean_and_se(values: torch.Tensor) -> dict[str, float | None]:
    """Mean over data points and its standard error (None for a single point)."""
    values = values.double()
    n = values.shape[0]
    se = values.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": _finite_or_none(values.mean().item()), "se": _finite_or_none(se)}


def evaluate(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *,
    num_samples: int,
    batch_size: int | None = None,
    data_plate: str = "data",
    rows_per_chunk: int | None = None,
    keep_log_weights: bool = False,
    progress: bool = False,
    distributed: Distributed = SINGLE,
    device: str | torch.device | None = None,
    surgery: bool = False,
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
    """
    batch_size = checked_arguments(x, num_samples, batch_size, "evaluate")
    if device is not None:
        device = resolve_device(device)
        x = x.to(device)
        move_pair(model, guide, device)
    rows_per_chunk = rows_per_chunk or default_rows_per_chunk(x.device)
    if x.device.type == "cpu":
        reuse_freed_memory_once()
    with torch.no_grad():
        first, batch_size = first_layout(model, guide, x, batch_size, data_plate)
    d = _evaluate(model, guide, x, first, num_samples, batch_size, data_plate, rows_per_chunk,
                  keep_log_weights, progress, distributed)
    d.observed, d.conditional = first.observed, first.conditional
    if surgery:
        from inference.diagnostics.surgery import elbo_surgery

        d.elbo_surgery = elbo_surgery(model, guide, x, num_samples=min(num_samples, 10),
                                      data_plate=data_plate).summary()
    return _on_cpu(d)


def _on_cpu(d: Diagnostics) -> Diagnostics:
    """``d`` with every tensor on the CPU (for plots, numpy and pickling across ranks)."""
    for f in fields(d):
        value = getattr(d, f.name)
        if torch.is_tensor(value):
            setattr(d, f.name, value.cpu())
        elif isinstance(value, dict) and value and torch.is_tensor(next(iter(value.values()))):
            setattr(d, f.name, {k: v.cpu() for k, v in value.items()})
    return d


def _evaluate(model: Callable, guide: Callable, x: torch.Tensor, first: PairLayout,
              num_samples: int, batch_size: int, data_plate: str, rows_per_chunk: int,
              keep_log_weights: bool, progress: bool, distributed: Distributed) -> Diagnostics:
    n = x.shape[0]
    if distributed.enabled and first.per_datapoint:
        share = x[distributed.shard(x.shape[0])]
        local = None
        if share.shape[0]:
            local = evaluate(model, guide, share, num_samples=num_samples, batch_size=batch_size,
                             data_plate=data_plate, rows_per_chunk=rows_per_chunk,
                             keep_log_weights=keep_log_weights, progress=progress)
        parts = [d for d in distributed.gather(local) if d is not None]
        return _concatenate([_as_part(d) for d in parts], num_samples)
    with torch.no_grad():
        if not first.per_datapoint:
            return _evaluate_data_set(model, guide, x, first, batch_size, num_samples,
                                      data_plate, rows_per_chunk, keep_log_weights, progress)
        if progress:
            # Only then: fit evaluates every epoch, and a Ctrl-C that lands in a finished bar's
            # __del__ is printed and dropped by Python instead of stopping the run.
            step = first.subsample or batch_size
            bar = tqdm(total=len(range(0, n, step)), desc="evaluate", unit="batch")
        parts = []
        for b in batches(model, guide, x, batch_size, first, data_plate):
            layout = first if b.start == 0 else inspect_pair(b.model, b.guide, b.x, data_plate)
            if not layout.per_datapoint:
                raise ConventionError(
                    f"sites {list(layout.global_sites)} are outside plate '{data_plate}' in the "
                    f"batch from row {b.start}: a pair's global latents must be the same in "
                    "every batch"
                )
            part = _evaluate_batch(b.model, b.guide, b.x, layout, num_samples, data_plate,
                                   max(1, rows_per_chunk // layout.rows(b.x)), keep_log_weights)
            parts.append(_first_rows(part, b.keep))
            if progress:
                bar.update()
    if progress:
        bar.close()
    d = _concatenate(parts, num_samples)
    d.notes.extend(_notes(first))
    return d


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
            layout: PairLayout, data_plate: str):
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


def _first_rows(part: dict, keep: int) -> dict:
    out = {}
    for key, value in part.items():
        if key == "log_weights" and value is not None:
            out[key] = value[:, :keep]
        elif torch.is_tensor(value):
            out[key] = value[:keep]
        elif isinstance(value, dict) and key != "kl_method":
            out[key] = {name: v[:keep] for name, v in value.items()}
        else:
            out[key] = value
    return out


def checked_arguments(x: torch.Tensor, num_samples: int, batch_size: int | None,
                      caller: str) -> int:
    """The batch size to use, after refusing arguments that cannot work."""
    if num_samples < 1:
        raise ConfigError(f"num_samples (K) must be a positive integer, got {num_samples}")
    if x.shape[0] == 0:
        raise ConfigError(f"{caller} got an empty data set (x has 0 rows)")
    batch_size = x.shape[0] if batch_size is None else batch_size
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")
    return batch_size


def first_layout(model: Callable, guide: Callable, x: torch.Tensor, batch_size: int,
                  data_plate: str) -> tuple[PairLayout, int]:
    """The first batch's layout, and the batch size to use.  A guide with parameters per data
    point (an autoguide on local latents) runs only on the whole data set it was built for."""
    try:
        return inspect_pair(model, guide, x[:batch_size], data_plate), batch_size
    except ConventionError:
        if batch_size >= x.shape[0]:
            raise
    # If the whole data set fails too, its error is the one that explains.
    return inspect_pair(model, guide, x, data_plate), x.shape[0]


def _notes(layout: PairLayout) -> list[str]:
    if layout.vectorized:
        return []
    return ["the pair does not broadcast over a leading particle dimension: evaluated one "
            "particle at a time (slower; see README, Conventions)"]


def _passes(model, guide, x, layout: PairLayout, k: int, replay=None):
    """``(guide_trace, model_trace)`` covering ``k`` particles: one vectorized pass, or ``k``
    passes for a pair that does not broadcast.  ``replay`` fixes global guide sites (a trace
    with the particle dimension, or a list of ``k`` traces)."""
    # Pyro's argument and support checks ran in inspect_pair; on every chunk they would cost
    # about a tenth of the time (measured with cProfile) and find nothing new.
    with pyro.validation_enabled(False):
        if layout.vectorized:
            return [trace_pair(model, guide, x, k, layout.particle_dim, replay)]
        return [trace_pair(model, guide, x, replay_guide=None if replay is None else replay[j])
                for j in range(k)]


def _site_terms(guide_trace, model_trace, layout: PairLayout, data_plate: str, k: int,
                n: int) -> dict:
    """Per-particle terms of one pass: ``local_*`` per data point ``[k, N]``, ``global_*``
    ``[k]``, KL per unit (site, or group of autoguide sites) ``[k, N or 1, D]``."""
    model_sites = sample_sites(model_trace)
    guide_sites = sample_sites(guide_trace)

    def reduce(values, site, trailing=0):
        out = per_datapoint(values, site, layout, data_plate, trailing).double()
        rows = n if data_frame(site, data_plate) is not None else 1
        return out.expand((k, rows) + out.shape[2:])

    # Each site's log-density once: the weights use all of them, the Monte Carlo KLs some.
    model_lp = {name: reduce(site_log_prob(site), site) for name, site in model_sites.items()}
    guide_lp = {name: reduce(site_log_prob(site), site) for name, site in guide_sites.items()}
    local_w = torch.zeros(k, n, dtype=torch.float64)
    global_w = torch.zeros(k, dtype=torch.float64)
    recon = torch.zeros(k, n, dtype=torch.float64)
    global_recon = torch.zeros(k, dtype=torch.float64)
    for sign, sites, lps in ((1.0, model_sites, model_lp), (-1.0, guide_sites, guide_lp)):
        for name, site in sites.items():
            lp = lps[name]
            if data_frame(site, data_plate) is not None:
                local_w = local_w + sign * lp
                if site["is_observed"]:
                    recon = recon + lp
            else:
                global_w = global_w + sign * lp[:, 0]
                if site["is_observed"]:
                    global_recon = global_recon + lp[:, 0]
    kl = _kl_units(model_sites, guide_sites, model_lp, guide_lp, layout, reduce)
    latent_mean = {}
    for name in layout.latent:
        site = guide_sites[name]
        if data_frame(site, data_plate) is not None:
            latent_mean[name] = _site_mean(site, guide_sites, layout, data_plate).expand(
                k, n, -1).double()
    return {"local_w": local_w, "global_w": global_w, "recon": recon,
            "global_recon": global_recon, "kl": kl, "latent_mean": latent_mean}


def _kl_units(model_sites: dict, guide_sites: dict, model_lp: dict, guide_lp: dict,
              layout: PairLayout, reduce):
    """KL(q || p) of each latent site, analytic where torch knows it; the sites an autoguide
    draws jointly from one auxiliary site form one unit named after them all (Monte Carlo).
    ``model_lp``/``guide_lp`` are the sites' reduced log-densities, ``[k, N or 1]``."""
    kl: dict[str, tuple[torch.Tensor, str]] = {}
    grouped: list[str] = []
    used_aux: set[str] = set()
    for name in layout.latent:
        q_site, p_site = guide_sites[name], model_sites[name]
        if not is_point_mass(q_site["fn"]):
            site_kl = _safe_kl(q_site["fn"], p_site["fn"], q_site["value"])
            value = _masked(site_kl.value, site_kl.event_ndim, q_site, p_site)
            kl[name] = (_per_dim(reduce, value, q_site, site_kl.event_ndim), site_kl.method)
            continue
        aux = guide_sites.get(f"{name}_unconstrained")
        if aux is None or aux["name"] not in layout.auxiliary:
            grouped.append(name)
            continue
        used_aux.add(aux["name"])
        # AutoNormal: z = T(u), u ~ aux.  With T the identity q(z) is aux's distribution.
        if _is_identity(p_site["fn"]):
            site_kl = _safe_kl(aux["fn"], p_site["fn"], q_site["value"])
            value = _masked(site_kl.value, site_kl.event_ndim, aux, p_site)
            kl[name] = (_per_dim(reduce, value, aux, site_kl.event_ndim), site_kl.method)
        else:
            value = guide_lp[aux["name"]] + guide_lp[name] - model_lp[name]
            kl[name] = (value.unsqueeze(-1), MONTE_CARLO)
    if grouped:
        parts = [guide_lp[a].sum(1, keepdim=True) for a in layout.auxiliary if a not in used_aux]
        parts += [(guide_lp[name] - model_lp[name]).sum(1, keepdim=True) for name in grouped]
        kl[" + ".join(grouped)] = (sum(parts).unsqueeze(-1), MONTE_CARLO)
    return kl


def _masked(value: torch.Tensor, event_ndim: int, *sites: dict) -> torch.Tensor:
    """A KL masked as the sites' log-densities are: else it would count steps the weights do
    not."""
    for site in sites:
        value = apply_mask(value, site, event_ndim)
    return value


def _per_dim(reduce, values, site, event_ndim) -> torch.Tensor:
    out = reduce(values, site, event_ndim)
    return out.reshape(out.shape[0], out.shape[1], -1)


def _is_identity(p) -> bool:
    t = biject_to(p.support)
    while isinstance(t, transforms.IndependentTransform):
        t = t.base_transform
    return t == transforms.identity_transform


def _safe_kl(q, p, z) -> SiteKL:
    """Closed form where torch has one and it computes; any failure of it (torch's KL
    functions that index with masks, say) falls back to Monte Carlo."""
    try:
        return kl_to_prior(q, p, z)
    except Exception:  # noqa: BLE001 - a KL function that fails is one we cannot use
        return SiteKL(q.log_prob(z) - p.log_prob(z), 0, MONTE_CARLO)


def _stack_passes(model, guide, x, layout, k, data_plate, replay=None):
    """``_site_terms`` of ``k`` particles, and the guide traces (for replaying global sites)."""
    passes = _passes(model, guide, x, layout, k, replay)
    per = [_site_terms(g, m, layout, data_plate, k if layout.vectorized else 1, layout.rows(x))
           for g, m in passes]
    if len(per) == 1:
        return per[0], passes
    out = {key: torch.cat([p[key] for p in per])
           for key in ("local_w", "global_w", "recon", "global_recon")}
    out["kl"] = {name: (torch.cat([p["kl"][name][0] for p in per]), per[0]["kl"][name][1])
                 for name in per[0]["kl"]}
    out["latent_mean"] = {name: torch.cat([p["latent_mean"][name] for p in per])
                          for name in per[0]["latent_mean"]}
    return out, passes


def _evaluate_batch(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    layout: PairLayout,
    num_samples: int,
    data_plate: str,
    particles_per_chunk: int,
    keep_log_weights: bool,
) -> dict:
    log_w, elbo_k = [], []
    kl_sums: dict[str, torch.Tensor] = {}
    mean_sums: dict[str, torch.Tensor] = {}
    kl_method: dict[str, str] = {}
    done = 0
    while done < num_samples:
        k = min(particles_per_chunk, num_samples - done)
        chunk, _ = _stack_passes(model, guide, x, layout, k, data_plate)
        kl_total = torch.zeros_like(chunk["local_w"])
        for name, (value, method) in chunk["kl"].items():
            summed = value.sum(0)
            kl_sums[name] = summed if name not in kl_sums else kl_sums[name] + summed
            kl_method[name] = method
            kl_total = kl_total + value.sum(-1)
        log_w.append(chunk["local_w"])
        elbo_k.append(chunk["recon"] - kl_total)
        for name, m in chunk["latent_mean"].items():
            summed = m.sum(0)
            mean_sums[name] = summed if name not in mean_sums else mean_sums[name] + summed
        done += k
    log_w_all = torch.cat(log_w)
    elbo_all = _with_control_variate(torch.cat(elbo_k), log_w_all)
    kl_per_dim = {name: s / num_samples for name, s in kl_sums.items()}
    kl_sites = {name: v.sum(1) for name, v in kl_per_dim.items()}
    kl_prior = (sum(kl_sites.values()) if kl_sites
                else torch.zeros(layout.rows(x), dtype=torch.float64))
    elbo = elbo_all.mean(0)
    stats = importance_stats(log_w_all, elbo_all)
    return {
        "elbo": elbo,
        "elbo_se": stats["elbo_se"],
        "reconstruction": elbo + kl_prior,
        "kl_prior": kl_prior,
        "log_evidence": stats["log_evidence"],
        "log_evidence_se": stats["log_evidence_se"],
        "evidence_gap": stats["log_evidence"] - elbo,
        "evidence_gap_se": stats["evidence_gap_se"],
        "kl_sites": kl_sites,
        "kl_per_dim": kl_per_dim,
        "kl_method": kl_method,
        "khat": khat_where_defined(log_w_all),
        "ess": importance_ess(log_w_all),
        "latent_mean": {name: s / num_samples for name, s in mean_sums.items()},
        "log_weights": log_w_all if keep_log_weights else None,
    }


def khat_where_defined(log_w: torch.Tensor) -> torch.Tensor:
    if log_w.shape[0] >= MIN_SAMPLES_KHAT:
        return pareto_khat(log_w)
    return torch.full((log_w.shape[1],), float("nan"), dtype=torch.float64)


def joint_chunks(model, guide, x, first: PairLayout, batch_size: int, num_samples: int,
                 data_plate: str, rows_per_chunk: int, progress: bool):
    """For each chunk of ``k`` particles: ``(k, batches)``, where ``batches`` yields
    ``(start row, layout, _site_terms)`` for every batch of x, the global guide sites drawn on
    the first batch and replayed on the others (so every batch sees the same k draws)."""
    n = x.shape[0]
    particles_per_chunk = max(1, rows_per_chunk // min(first.subsample or batch_size, n))
    layouts: dict[int, PairLayout] = {0: first}
    chunks = range(0, num_samples, particles_per_chunk)
    if progress:
        chunks = tqdm(chunks, desc="evaluate", unit="chunk")

    def chunk(k):
        replay = None
        for b in batches(model, guide, x, batch_size, first, data_plate):
            if b.start not in layouts:
                layouts[b.start] = inspect_pair(b.model, b.guide, b.x, data_plate)
            layout = layouts[b.start]
            terms, passes = _stack_passes(b.model, b.guide, b.x, layout, k, data_plate, replay)
            if replay is None:
                replay = [global_part(g, layout) for g, _ in passes]
                replay = replay[0] if layout.vectorized else replay
            yield b.start, layout, _first_columns(terms, b.keep)

    for done in chunks:
        k = min(particles_per_chunk, num_samples - done)
        yield k, chunk(k)


def _first_columns(terms: dict, keep: int) -> dict:
    """Per-point terms ``[k, rows, ...]`` of a pass cut to its first ``keep`` points."""
    out = dict(terms)
    for key in ("local_w", "recon"):
        out[key] = terms[key][:, :keep]
    out["kl"] = {name: (value[:, :keep], method) for name, (value, method) in terms["kl"].items()}
    return out


def _evaluate_data_set(model, guide, x, first: PairLayout, batch_size: int,
                       num_samples: int, data_plate: str, rows_per_chunk: int,
                       keep_log_weights: bool, progress: bool) -> Diagnostics:
    """Joint importance sampling over every latent variable of the data set: each draw of the
    global sites is shared by every batch, and its weight sums the whole data set."""
    n = x.shape[0]
    log_w, elbo_k = [], []
    kl_sums: dict[str, torch.Tensor] = {}
    kl_method: dict[str, str] = {}
    for k, batches in joint_chunks(model, guide, x, first, batch_size, num_samples, data_plate,
                                   rows_per_chunk, progress):
        total_w = torch.zeros(k, dtype=torch.float64)
        total_recon = torch.zeros(k, dtype=torch.float64)
        total_kl = torch.zeros(k, dtype=torch.float64)
        for s, layout, terms in batches:
            if s == 0:
                total_w = total_w + terms["global_w"]
                total_recon = total_recon + terms["global_recon"]
            total_w = total_w + terms["local_w"].sum(1)
            total_recon = total_recon + terms["recon"].sum(1)
            for name, (value, method) in terms["kl"].items():
                if value.shape[1] == 1 and s != 0 and _is_global_unit(name, layout):
                    continue  # a global site's KL counts once
                per_dim = value.sum(1)
                kl_sums[name] = per_dim.sum(0) + kl_sums.get(name, 0)
                kl_method[name] = method
                total_kl = total_kl + per_dim.sum(-1)
        log_w.append(total_w)
        elbo_k.append(total_recon - total_kl)
    log_w_all = torch.cat(log_w).unsqueeze(1)
    elbo_all = _with_control_variate(torch.cat(elbo_k).unsqueeze(1), log_w_all)
    stats = importance_stats(log_w_all, elbo_all)
    kl_per_dim = {name: (s / num_samples).unsqueeze(0) for name, s in kl_sums.items()}
    kl_sites = {name: v.sum(1) for name, v in kl_per_dim.items()}
    kl_prior = float(sum(v.sum() for v in kl_sites.values())) if kl_sites else 0.0
    elbo = float(elbo_all.mean())
    khat = khat_where_defined(log_w_all)
    ess = importance_ess(log_w_all)
    total = DataSetTotals(
        num_data=n, elbo=elbo, elbo_se=float(stats["elbo_se"][0]),
        reconstruction=elbo + kl_prior, kl_prior=kl_prior,
        log_evidence=float(stats["log_evidence"][0]),
        log_evidence_se=float(stats["log_evidence_se"][0]),
        evidence_gap=float(stats["log_evidence"][0]) - elbo,
        evidence_gap_se=float(stats["evidence_gap_se"][0]),
        khat=float(khat[0]), ess=float(ess[0]),
    )
    return Diagnostics(
        elbo=None, elbo_se=None, reconstruction=None, kl_prior=None, log_evidence=None,
        log_evidence_se=None, evidence_gap=None, evidence_gap_se=None,
        kl_sites=kl_sites, kl_per_dim=kl_per_dim, kl_method=kl_method, khat=khat, ess=ess,
        latent_mean={}, num_samples=num_samples, total=total, unit=DATA_SET,
        notes=_notes(first) + [_global_note(first, n)],
        log_weights=log_w_all if keep_log_weights else None,
    )


def _global_note(layout: PairLayout, n: int) -> str:
    latent = [name for name in layout.global_sites if name in layout.latent]
    why = (f"global latent variables {latent}" if latent else
           f"guide site(s) {[g for g in layout.global_sites if g not in layout.observed]} "
           "outside the data plate draw(s) the latents of all points jointly")
    if not latent and any(name in layout.observed for name in layout.global_sites):
        why = "no data plate: the model observes x as one whole"
    return f"{why}: the unit is the data set ({n} points), one joint importance weight per draw"


def _is_global_unit(name: str, layout: PairLayout) -> bool:
    return any(part in layout.global_sites for part in name.split(" + "))


def _site_mean(site: dict, guide_sites: dict, layout: PairLayout, data_plate: str) -> torch.Tensor:
    """E_q[z | x] at a guide site as ``[k, N, D]``: the distribution's mean, else the draw."""
    fn = site["fn"]
    if is_point_mass(fn):
        aux = guide_sites.get(f"{site['name']}_unconstrained")
        if aux is not None and aux["fn"].event_shape == fn.event_shape:
            fn = aux["fn"]  # AutoNormal's unconstrained Normal: its mean, on that scale
    try:
        mean = fn.mean.expand(fn.batch_shape + fn.event_shape)
    except NotImplementedError:
        mean = site["value"]
    return datapoint_rows(mean, site, layout, data_plate, len(fn.event_shape))


def _as_part(d: Diagnostics) -> dict:
    return {f.name: getattr(d, f.name) for f in fields(d)}


def data_set_totals(d: dict, n: int) -> DataSetTotals:
    """Sums over the points of a pair of local latents (independent Monte Carlo errors)."""
    def se(key):
        return float(d[key].double().pow(2).sum().sqrt())

    return DataSetTotals(
        num_data=n, elbo=float(d["elbo"].sum()), elbo_se=se("elbo_se"),
        reconstruction=float(d["reconstruction"].sum()), kl_prior=float(d["kl_prior"].sum()),
        log_evidence=float(d["log_evidence"].sum()), log_evidence_se=se("log_evidence_se"),
        evidence_gap=float(d["evidence_gap"].sum()), evidence_gap_se=se("evidence_gap_se"),
    )


def _concatenate(parts: list[dict], num_samples: int) -> Diagnostics:
    """One Diagnostics from batches; a site some batches lack adds nothing to their points
    (KL 0, no latent mean: NaN)."""
    def cat(key):
        return torch.cat([p[key] for p in parts])

    sizes = [p["elbo"].shape[0] for p in parts]

    def merged(key, fill):
        names = list(dict.fromkeys(name for p in parts for name in p[key]))
        out = {}
        for name in names:
            template = next(p[key][name] for p in parts if name in p[key])
            out[name] = torch.cat([
                p[key][name] if name in p[key]
                else template.new_full((size,) + template.shape[1:], fill)
                for p, size in zip(parts, sizes, strict=True)
            ])
        return out

    kl_method = {}
    for p in parts:
        for name, method in p["kl_method"].items():
            # A site that needed Monte Carlo in any batch is reported as such.
            if kl_method.get(name) != MONTE_CARLO:
                kl_method[name] = method
    kl_per_dim = merged("kl_per_dim", 0.0)
    d = {
        key: cat(key) for key in ("elbo", "elbo_se", "reconstruction", "kl_prior", "log_evidence",
                                  "log_evidence_se", "evidence_gap", "evidence_gap_se", "khat",
                                  "ess")
    }
    notes = list(dict.fromkeys(note for p in parts for note in p.get("notes", [])))
    return Diagnostics(
        **d,
        kl_sites={name: v.sum(1) for name, v in kl_per_dim.items()},
        kl_per_dim=kl_per_dim,
        kl_method=kl_method,
        latent_mean=merged("latent_mean", float("nan")),
        num_samples=num_samples,
        total=data_set_totals(d, sum(sizes)),
        notes=notes,
        log_weights=(
            torch.cat([p["log_weights"] for p in parts], 1) if parts[0]["log_weights"] is not None
            else None
        ),
    )


def _with_control_variate(elbo_k: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """Per-particle ELBO terms ``e_k - gamma c_k``, with c_k the Monte Carlo KL's deviation.

    c_k = [log q(z_k) - log p(z_k)] - KL_analytic has mean exactly zero, and e_k - c_k is the
    log-weight.  gamma, fitted per data point by least squares, interpolates between the
    analytic-KL estimator (gamma = 0, best for a poor guide) and the log-weight mean (gamma = 1,
    exact for a perfect guide, whose log-weights are constant).  Fitting it on the same draws
    biases the mean by O(1/K), so it is only used from ``MIN_SAMPLES_CONTROL_VARIATE`` draws on.
    """
    if elbo_k.shape[0] < MIN_SAMPLES_CONTROL_VARIATE:
        return elbo_k
    c = elbo_k - log_w
    c_centred = c - c.mean(0)
    var_c = c_centred.pow(2).sum(0)
    cov = ((elbo_k - elbo_k.mean(0)) * c_centred).sum(0)
    gamma = torch.where(var_c > 0, cov / var_c.clamp_min(1e-300), torch.zeros_like(var_c))
    return elbo_k - gamma * c


def importance_stats(log_w: torch.Tensor, elbo_k: torch.Tensor) -> dict[str, torch.Tensor]:
    """log-mean-exp of ``log_w`` over particles (dim 0) and delta-method standard errors.

    With w normalized by its maximum, the estimator log(mean w) has variance
    Var(w) / (K mean(w)^2); the gap log(mean w) - mean(e) adds Var(e)/K - 2 Cov(w, e)/(K mean w).
    """
    k = log_w.shape[0]
    log_evidence = torch.logsumexp(log_w, 0) - math.log(k)
    w = torch.exp(log_w - log_w.max(0, keepdim=True).values)
    w_mean = w.mean(0)
    nan = torch.full_like(w_mean, float("nan"))
    if k < 2:
        return {"log_evidence": log_evidence, "log_evidence_se": nan, "elbo_se": nan,
                "evidence_gap_se": nan}
    rel = w / w_mean
    var_rel = rel.var(0)
    var_e = elbo_k.var(0)
    cov = ((rel - 1) * (elbo_k - elbo_k.mean(0))).sum(0) / (k - 1)
    gap_var = (var_rel + var_e - 2 * cov).clamp_min(0)
    return {
        "log_evidence": log_evidence,
        "log_evidence_se": (var_rel / k).sqrt(),
        "elbo_se": (var_e / k).sqrt(),
        "evidence_gap_se": (gap_var / k).sqrt(),
    }

