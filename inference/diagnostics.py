"""Per-datapoint ELBO, KL to the prior, importance-sampled evidence and the evidence gap.

For each data point x_n and K draws z_k ~ q(z | x_n) (the guide), with
log-weights  w_k = log p(x_n, z_k) - log q(z_k | x_n):

* ``reconstruction`` = E_q[log p(x_n | z)]            (Monte Carlo over k, all observed sites)
* ``kl_prior``       = KL(q(z | x_n) || p(z))          (analytic per latent site where known)
* ``elbo``           = reconstruction - kl_prior
* ``log_evidence``   = log (1/K) sum_k exp(w_k)        (importance sampling, q as proposal)
* ``evidence_gap``   = log_evidence - elbo             (estimates KL(q(z | x_n) || p(z | x_n)))

The Monte Carlo part uses the sampled KL, log q(z_k) - log p(z_k), as a control variate for
the reconstruction term (from 20 draws on): with a perfect guide the log-weights are constant and
the ELBO, and so the gap, come out exact instead of carrying the reconstruction's sampling noise.

All in nats per data point.  ``log_evidence`` is a stochastic lower bound on log p(x_n) whose
bias shrinks as K grows (Burda et al. 2016), so ``evidence_gap`` is an underestimate of the
true gap for small K.  Standard errors are Monte Carlo errors over the K draws (delta method
for the log of a mean).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import pyro
import torch
from tqdm.auto import tqdm

from inference.distributed import SINGLE, Distributed
from inference.errors import ConfigError
from inference.kl import MONTE_CARLO, kl_to_prior
from inference.psis import importance_ess, khat_summary, pareto_khat
from inference.traces import (
    PairLayout,
    datapoint_rows,
    inspect_pair,
    per_datapoint,
    sample_sites,
    site_log_prob,
)
from inference.traces import trace_pair as _trace_pair

# Burda et al. (2016): a latent dimension is active when Cov_x(E_q[z_d | x]) exceeds this.
ACTIVE_UNIT_THRESHOLD = 0.01
# PSIS fits the largest min(K/5, 3 sqrt(K)) weights: below this K there is no tail to fit.
MIN_SAMPLES_KHAT = 20

# Rows (particles x data points) pushed through the pair at once: bounds memory for any K. 4096
# keeps the intermediates of a 784-pixel decoder (12 MiB each) near the caches: measured 12 us per
# row against 20 us at 32768, and below 2048 the per-pass Python cost of Pyro shows.
DEFAULT_ROWS_PER_CHUNK = 4096

# Below this many draws the ELBO uses the analytic KL alone (see _with_control_variate).
MIN_SAMPLES_CONTROL_VARIATE = 20

PER_DATAPOINT_FIELDS = (
    "elbo",
    "reconstruction",
    "kl_prior",
    "log_evidence",
    "evidence_gap",
)


@dataclass
class Diagnostics:
    """Per-datapoint diagnostics; every tensor of shape ``[N]`` is in nats."""

    elbo: torch.Tensor
    elbo_se: torch.Tensor
    reconstruction: torch.Tensor
    kl_prior: torch.Tensor
    log_evidence: torch.Tensor
    log_evidence_se: torch.Tensor
    evidence_gap: torch.Tensor
    evidence_gap_se: torch.Tensor
    kl_sites: dict[str, torch.Tensor]
    kl_per_dim: dict[str, torch.Tensor]
    kl_method: dict[str, str]
    khat: torch.Tensor
    ess: torch.Tensor
    latent_mean: dict[str, torch.Tensor]
    num_samples: int
    log_weights: torch.Tensor | None = field(default=None, repr=False)

    def active_units(self, threshold: float = ACTIVE_UNIT_THRESHOLD) -> dict[str, torch.Tensor]:
        """Per latent site, which dimensions have Cov_x(E_q[z_d | x]) > threshold."""
        return {name: m.var(0, unbiased=False) > threshold for name, m in self.latent_mean.items()}

    @property
    def num_data(self) -> int:
        return int(self.elbo.shape[0])

    def summary(self) -> dict:
        """Dataset means, each with the standard error of the mean over data points."""
        out: dict = {"num_data": self.num_data, "num_samples": self.num_samples}
        for name in PER_DATAPOINT_FIELDS:
            out[name] = mean_and_se(getattr(self, name))
        # Monte Carlo error of the dataset means (independent across points): what separates
        # an estimate from the exact value on the same points.
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
            name: [float(v) for v in value.mean(0)] for name, value in self.kl_per_dim.items()
        }
        if self.num_samples >= MIN_SAMPLES_KHAT:
            out["khat"] = khat_summary(self.khat)
        out["ess"] = {"mean": float(self.ess.mean()), "min": float(self.ess.min())}
        out["active_units"] = active_units_summary(self)
        return out


def active_units_summary(d: Diagnostics) -> dict:
    """Active dimensions per site and a warning when most are not (posterior collapse)."""
    if d.num_data < 2:
        return {"sites": {}, "active": None, "total": None, "warning": None}
    active = d.active_units()
    variances = {name: m.var(0, unbiased=False) for name, m in d.latent_mean.items()}
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
    rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK,
    keep_log_weights: bool = False,
    progress: bool = False,
    distributed: Distributed = SINGLE,
) -> Diagnostics:
    """Diagnose the guide of any model/guide pair that follows the conventions.

    :param x: data, first dimension indexing the N data points.
    :param num_samples: K, draws from the guide per data point.
    :param batch_size: data points per pass (all at once when None).
    :param data_plate: name of the plate that indexes data points in model and guide.
    :param rows_per_chunk: particles x data points evaluated at once; memory stays bounded in K.
    :param keep_log_weights: also return the ``[K, N]`` importance log-weights.
    :param distributed: under torchrun, each rank evaluates its share of the points and every
        rank gets all of them back, in their original order.
    """
    if distributed.enabled:
        share = x[distributed.shard(x.shape[0])]
        local = None
        if share.shape[0]:
            local = evaluate(model, guide, share, num_samples=num_samples, batch_size=batch_size,
                             data_plate=data_plate, rows_per_chunk=rows_per_chunk,
                             keep_log_weights=keep_log_weights, progress=progress)
        parts = [d for d in distributed.gather(local) if d is not None]
        return _concatenate([{f.name: getattr(d, f.name) for f in fields(d)} for d in parts],
                            num_samples)
    if num_samples < 1:
        raise ConfigError(f"num_samples (K) must be a positive integer, got {num_samples}")
    if x.shape[0] == 0:
        raise ConfigError("evaluate got an empty data set (x has 0 rows)")
    n = x.shape[0]
    batch_size = n if batch_size is None else batch_size
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")
    with torch.no_grad():
        layout = inspect_pair(model, guide, x[:batch_size], data_plate)
        starts = range(0, n, batch_size)
        if progress:
            # Only then: fit evaluates every epoch, and a Ctrl-C that lands in a finished bar's
            # __del__ is printed and dropped by Python instead of stopping the run.
            starts = tqdm(starts, desc="evaluate", unit="batch")
        parts = [
            _evaluate_batch(
                model, guide, x[s : s + batch_size], layout, num_samples, data_plate,
                max(1, rows_per_chunk // min(batch_size, n - s)), keep_log_weights,
            )
            for s in starts
        ]
    return _concatenate(parts, num_samples)


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
        chunk = _particle_terms(model, guide, x, layout, k, data_plate)
        log_w.append(chunk["log_w"])
        elbo_k.append(chunk["reconstruction"] - chunk["kl"])
        for name, kl_dim in chunk["kl_per_dim"].items():
            summed = kl_dim.double().sum(0)
            kl_sums[name] = summed if name not in kl_sums else kl_sums[name] + summed
        for name, m in chunk["latent_mean"].items():
            summed = m.double().sum(0)
            mean_sums[name] = summed if name not in mean_sums else mean_sums[name] + summed
        kl_method.update(chunk["kl_method"])
        done += k
    log_w_all = torch.cat(log_w).double()
    elbo_all = _with_control_variate(torch.cat(elbo_k).double(), log_w_all)
    kl_per_dim = {name: s / num_samples for name, s in kl_sums.items()}
    kl_sites = {name: v.sum(1) for name, v in kl_per_dim.items()}
    kl_prior = sum(kl_sites.values())
    elbo = elbo_all.mean(0)
    stats = _importance_stats(log_w_all, elbo_all)
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
        "khat": (pareto_khat(log_w_all) if num_samples >= MIN_SAMPLES_KHAT
                 else torch.full((x.shape[0],), float("nan"), dtype=torch.float64)),
        "ess": importance_ess(log_w_all),
        "latent_mean": {name: s / num_samples for name, s in mean_sums.items()},
        "log_weights": log_w_all if keep_log_weights else None,
    }


def _particle_terms(
    model: Callable, guide: Callable, x: torch.Tensor, layout: PairLayout, k: int, data_plate: str
) -> dict:
    """Per-particle, per-datapoint terms ``[k, N]`` from one vectorized pass of the pair."""
    # Pyro's argument and support checks ran in inspect_pair; on every chunk they would cost
    # about a tenth of the time (measured with cProfile) and find nothing new.
    with pyro.validation_enabled(False):
        guide_trace, model_trace = _trace_pair(model, guide, x, k, layout.particle_dim)
    model_sites = sample_sites(model_trace)
    guide_sites = sample_sites(guide_trace)
    shape = (k, x.shape[0])

    def reduce(values, site, trailing=0):
        out = per_datapoint(values, site, layout, data_plate, trailing)
        return out.expand(shape + out.shape[2:])

    log_w = torch.zeros(shape)
    reconstruction = torch.zeros_like(log_w)
    for site in model_sites.values():
        lp = reduce(site_log_prob(site), site)
        log_w = log_w + lp
        if site["is_observed"]:
            reconstruction = reconstruction + lp
    for site in guide_sites.values():
        log_w = log_w - reduce(site_log_prob(site), site)

    kl = torch.zeros_like(log_w)
    kl_per_dim, kl_method, latent_mean = {}, {}, {}
    for name in layout.latent:
        q_site, p_site = guide_sites[name], model_sites[name]
        site_kl = kl_to_prior(q_site["fn"], p_site["fn"], q_site["value"])
        per_dim = reduce(site_kl.value, q_site, site_kl.event_ndim).reshape(shape + (-1,))
        kl_per_dim[name] = per_dim
        kl_method[name] = site_kl.method
        kl = kl + per_dim.sum(-1)
        latent_mean[name] = _site_mean(q_site, layout, data_plate).expand(shape + (-1,))
    return {
        "log_w": log_w,
        "reconstruction": reconstruction,
        "kl": kl,
        "kl_per_dim": kl_per_dim,
        "kl_method": kl_method,
        "latent_mean": latent_mean,
    }


def _site_mean(site: dict, layout: PairLayout, data_plate: str) -> torch.Tensor:
    """E_q[z | x] at a guide site as ``[k, N, D]``: the distribution's mean, else the draw."""
    fn = site["fn"]
    try:
        mean = fn.mean.expand(fn.batch_shape + fn.event_shape)
    except NotImplementedError:
        mean = site["value"]
    return datapoint_rows(mean, site, layout, data_plate, len(fn.event_shape))


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


def _importance_stats(log_w: torch.Tensor, elbo_k: torch.Tensor) -> dict[str, torch.Tensor]:
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


def _concatenate(parts: list[dict], num_samples: int) -> Diagnostics:
    def cat(key):
        return torch.cat([p[key] for p in parts])

    def cat_dict(key):
        return {name: torch.cat([p[key][name] for p in parts]) for name in parts[0][key]}

    kl_method = {}
    for p in parts:
        for name, method in p["kl_method"].items():
            # A site that needed Monte Carlo in any batch is reported as such.
            if kl_method.get(name) != MONTE_CARLO:
                kl_method[name] = method
    return Diagnostics(
        elbo=cat("elbo"),
        elbo_se=cat("elbo_se"),
        reconstruction=cat("reconstruction"),
        kl_prior=cat("kl_prior"),
        log_evidence=cat("log_evidence"),
        log_evidence_se=cat("log_evidence_se"),
        evidence_gap=cat("evidence_gap"),
        evidence_gap_se=cat("evidence_gap_se"),
        kl_sites=cat_dict("kl_sites"),
        kl_per_dim=cat_dict("kl_per_dim"),
        kl_method=kl_method,
        khat=cat("khat"),
        ess=cat("ess"),
        latent_mean=cat_dict("latent_mean"),
        num_samples=num_samples,
        log_weights=(
            torch.cat([p["log_weights"] for p in parts], 1) if parts[0]["log_weights"] is not None
            else None
        ),
    )
