"""Means with their standard errors, and the log of a mean of exponentials (the estimator of
every evidence elbogap reports), with the delta-method standard error of each."""

from __future__ import annotations

import math

import torch


def finite_or_none(value: float) -> float | None:
    """``value``, or None where it is NaN or infinite (JSON has no such numbers)."""
    return value if math.isfinite(value) else None


def mean_and_se(values: torch.Tensor) -> dict[str, float | None]:
    """Mean over data points (dim 0) and its standard error (None for a single point)."""
    values = values.double()
    n = values.shape[0]
    se = values.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": finite_or_none(values.mean().item()), "se": finite_or_none(se)}


def log_mean_exp_with_se(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log of the mean over dim 0 of exp(log_w), and its delta-method standard error."""
    c = log_w.shape[0]
    log_mean = torch.logsumexp(log_w, 0) - math.log(c)
    w = (log_w - log_mean).exp()  # weights relative to their mean
    se = w.std(0) / math.sqrt(c) if c > 1 else torch.full_like(log_mean, float("nan"))
    return log_mean, se


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
