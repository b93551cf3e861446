"""Can the importance-sampled evidence be believed?  Pareto k-hat and the effective sample size.

k-hat is the shape of a generalized Pareto distribution fitted to the largest importance
weights (PSIS; Vehtari, Simpson, Gelman, Yao & Gabry 2024).  Yao, Vehtari, Simpson & Gelman
(2018) read it as: k < 0.5 good, 0.5 <= k <= 0.7 usable (slow convergence), k > 0.7 unreliable
(the estimate of log p(x), and so the gap, may be far off however large K is).

Beside the effective sample size, one reading changes.  A point whose weights are nearly equal
(ESS >= ``ESS_NEARLY_ALL`` of K) can still get k-hat > 0.7: the log-weight is unbounded in a
region of tiny mass (a guide normal in log z against a Gamma posterior, whose log-density in
log z falls off linearly, not quadratically), which K draws barely reach.  The Pareto fit then
rests on the one or two draws that landed there, and it jumps with K (Poisson counts with a
Gamma prior and that guide: median k-hat 1.03 at K = 1000, 2.37 at K = 4000, 0.46 at
K = 10^5) while the estimate hardly moves (within 0.0005 nats of the exact log p(x)).  Such
a k-hat is called *unstable*, not a verdict on the estimate: the summary counts those points
apart, and a larger K or AIS settles them.  Where most weight sits on few draws (low ESS),
k-hat > 0.7 is read as before.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .wording import counted

KHAT_GOOD = 0.5
KHAT_UNRELIABLE = 0.7
# What no k-hat can see: it judges the tail of the weights the proposal drew, so a mode of the
# posterior the guide never reaches (a mixture's other labelling, say) leaves no trace in it.
UNSEEN_MODES = ("k-hat cannot see a posterior mode the guide never reaches: "
                "evaluate(defensive=...) and AIS from the prior can")
# Log-weights spread less than this (nats) are constant to rounding (see pareto_khat).
CONSTANT_SPREAD = 1e-4
# PSIS fits the largest ceil(min(K/5, 3 sqrt(K))) weights and needs at least 5 of them (ArviZ
# returns +inf below that): from K = 25 on there is a tail to fit.
MIN_SAMPLES_KHAT = 25
# ESS at least this share of K: weights nearly equal (a k-hat > 0.7 there is unstable).
ESS_NEARLY_ALL = 0.9


def import_arviz():
    """ArviZ 0.x announces its coming refactor with a FutureWarning on import; users get the
    message from ArviZ's own documentation, not on every elbogap run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def _tail_cut(num_samples: int) -> int:
    """The length of the tail PSIS fits: the largest ceil(min(K/5, 3 sqrt(K))) weights."""
    return math.ceil(min(0.2 * num_samples, 3 * math.sqrt(num_samples)))


def tail_length(num_samples: int) -> int:
    """How many of the largest log-weights PSIS reads: its tail and the cutoff below it."""
    return min(num_samples, _tail_cut(num_samples) + 1)


def pareto_khat(log_weights: torch.Tensor) -> torch.Tensor:
    """k-hat of the importance weights of each data point; ``log_weights`` is ``[K, N]``.

    Constant weights (a guide equal to the posterior) have no tail to fit: their k-hat is
    -inf, the limit of bounded weights.  Weights equal up to the rounding of float32
    log-densities (a spread below ``CONSTANT_SPREAD`` nats, more for log-weights of large
    magnitude, whose rounding is larger) are constant too: a Pareto tail fitted to rounding is
    fitted to noise.
    """
    lw = log_weights.detach().double()
    top = lw.topk(tail_length(lw.shape[0]), dim=0).values
    return khat_from_tail(top, lw.max(0).values, lw.min(0).values, lw.shape[0])


def khat_from_tail(top: torch.Tensor, maximum: torch.Tensor, minimum: torch.Tensor,
                   num_samples: int) -> torch.Tensor:
    """k-hat per row from its ``tail_length(num_samples)`` largest log-weights ``top``
    ``[L, rows]`` and the extremes of all of them (weights constant to rounding: -inf).  What
    PSIS reads is only that tail, so a running top-k (``WeightMoments``) gives the k-hat of
    the whole array, with no ArviZ version in between (1.x moved and re-signed psislw)."""
    top, hi, lo = (t.detach().double().cpu().numpy() for t in (top, maximum, minimum))
    spread = hi - lo
    constant = spread <= CONSTANT_SPREAD * (1.0 + 1e-2 * np.maximum(np.abs(hi), np.abs(lo)))
    khat = np.full(top.shape[1], -math.inf)
    m = _tail_cut(num_samples)
    for row in np.flatnonzero(~constant):
        khat[row] = _psis_khat(np.sort(top[:, row])[::-1], m)
    return torch.from_numpy(khat)


def _psis_khat(descending: np.ndarray, m: int) -> float:
    """PSIS's k-hat (Vehtari et al. 2024, as ArviZ 0.x's psislw with r_eff = 1) from the
    largest m + 1 log-weights, in descending order."""
    if len(descending) <= m:  # fewer than 5 draws: no tail to fit (as ArviZ)
        return math.inf
    x = descending - descending[0]
    cutoff = max(x[m], np.log(np.finfo(float).tiny))
    tail = x[x > cutoff]
    if len(tail) <= 4:
        return math.inf
    return _gpd_shape(np.sort(np.exp(tail) - np.exp(cutoff)))


def _gpd_shape(ascending: np.ndarray) -> float:
    """The generalized Pareto shape of a sorted sample: Zhang & Stephens' (2009) empirical
    Bayes estimate with the weakly informative prior that PSIS adds (ArviZ's _gpdfit)."""
    n = len(ascending)
    m_est = 30 + int(n ** 0.5)
    b = 1 - np.sqrt(m_est / (np.arange(1, m_est + 1, dtype=float) - 0.5))
    b /= 3 * ascending[int(n / 4 + 0.5) - 1]
    b += 1 / ascending[-1]
    k = np.log1p(-b[:, None] * ascending).mean(axis=1)
    len_scale = n * (np.log(-(b / k)) - k - 1)
    with np.errstate(over="ignore"):  # exp overflowing to inf: a weight of 0, as meant
        weights = 1 / np.exp(len_scale - len_scale[:, None]).sum(axis=1)
    real = weights >= 10 * np.finfo(float).eps
    weights, b = weights[real], b[real]
    b_post = np.sum(b * weights / weights.sum())
    k_post = np.log1p(-b_post * ascending).mean()
    return float((n * k_post + 10 * 0.5) / (n + 10))


def khat_where_defined(log_weights: torch.Tensor) -> torch.Tensor:
    """``pareto_khat`` from ``MIN_SAMPLES_KHAT`` draws on; NaN for each point below that."""
    if log_weights.shape[0] >= MIN_SAMPLES_KHAT:
        return pareto_khat(log_weights)
    return torch.full((log_weights.shape[1],), float("nan"), dtype=torch.float64)


def importance_ess(log_weights: torch.Tensor) -> torch.Tensor:
    """Effective sample size (sum w)^2 / sum w^2 of each data point's K weights, ``[N]``."""
    lw = log_weights.double()
    return torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0))


def khat_summary(khat: torch.Tensor, unit: str = "data point", ess: torch.Tensor | None = None,
                 num_samples: int | None = None, subject: str = "evidence") -> dict:
    """Shares of points in each reliability band, and a plain verdict.  With each point's
    ``ess`` of ``num_samples`` draws, k-hat > 0.7 on nearly equal weights is counted apart as
    unstable (``share_unstable``, within ``share_unreliable``; see the module's docstring).
    ``subject`` is what the weights estimate ("evidence", or "predictive density")."""
    one, every = _ESTIMATES[subject]
    n = khat.numel()
    if unit != "data point":
        return _joint_khat_summary(float(khat[0]))
    high = khat > KHAT_UNRELIABLE
    unstable = torch.zeros_like(high)
    if ess is not None and num_samples:
        unstable = high & (ess.to(khat.device) >= ESS_NEARLY_ALL * num_samples)
    bad, wobbly = int((high & ~unstable).sum()), int(unstable.sum())
    ok = int(((khat >= KHAT_GOOD) & (khat <= KHAT_UNRELIABLE)).sum())
    finite = khat[torch.isfinite(khat)]
    # NaN where the weights were not numbers (-inf is a perfect guide's: constant weights).
    undefined = int(torch.isnan(khat).sum())
    verdicts = []
    if undefined:
        verdicts.append(f"{undefined} of {counted(n, 'point')} have no k-hat: their importance weights are "
                        "not finite numbers (see the notes)")
    if bad:
        verdicts.append(
            f"{bad} of {counted(n, 'point')} ({100 * bad / n:.1f} %) have k-hat > {KHAT_UNRELIABLE}: their "
            f"{every} are NOT reliable (the guide's tails are too light for "
            "importance sampling); treat those numbers as lower bounds"
        )
    if wobbly:
        verdicts.append(
            f"{wobbly} of {counted(n, 'point')} ({100 * wobbly / n:.1f} %) have k-hat > {KHAT_UNRELIABLE} "
            f"on nearly equal weights (ESS >= {ESS_NEARLY_ALL:.0%} of K): k-hat unstable there "
            "(its Pareto fit rests on the few draws that reach a far tail, and changes with "
            f"K), not a sign that their {one} is off; a larger K or AIS settles them"
        )
    if verdicts or undefined == n:
        verdict = "; ".join(verdicts)
    elif ok:
        verdict = (
            f"all points have k-hat <= {KHAT_UNRELIABLE}; {ok} in [{KHAT_GOOD}, "
            f"{KHAT_UNRELIABLE}] converge slowly: use a large K ({UNSEEN_MODES})"
        )
    else:
        verdict = (f"all points have k-hat < {KHAT_GOOD}: the {subject} estimates are reliable "
                   f"where the guide covers the posterior's modes ({UNSEEN_MODES})")
    return {
        "median": float(finite.median()) if finite.numel() else None,
        "max": float(finite.max()) if finite.numel() else None,
        "share_good": float((khat < KHAT_GOOD).double().mean()),
        "share_ok": ok / n,
        "share_unreliable": (bad + wobbly) / n,
        "share_unstable": wobbly / n,
        "verdict": verdict,
    }


# What the weights of a subject estimate, for one point and for every point's verdict.
_ESTIMATES = {"evidence": ("log p(x)", "log p(x) and evidence gap"),
              "predictive density": ("log predictive density", "log predictive densities")}


def _joint_khat_summary(k: float) -> dict:
    """The verdict on the one k-hat of the joint weights of a data set (global latents)."""
    if math.isnan(k):
        verdict = ("no k-hat: the joint importance weights are not finite numbers (see the "
                   "notes)")
    elif k > KHAT_UNRELIABLE:
        verdict = (f"k-hat of the joint weights {k:.2f} > {KHAT_UNRELIABLE}: log p(x_1..N) and "
                   "the evidence gap are NOT reliable; treat them as lower bounds")
    elif k >= KHAT_GOOD:
        verdict = (f"k-hat of the joint weights {k:.2f} in [{KHAT_GOOD}, {KHAT_UNRELIABLE}]: use "
                   f"a large K ({UNSEEN_MODES})")
    else:
        verdict = (f"k-hat of the joint weights {k:.2f} < {KHAT_GOOD}: the evidence estimate is "
                   f"reliable where the guide covers the posterior's modes ({UNSEEN_MODES})")
    finite = math.isfinite(k)
    return {"median": k if finite else None, "max": k if finite else None,
            "share_good": float(k < KHAT_GOOD), "share_ok": float(KHAT_GOOD <= k <= KHAT_UNRELIABLE),
            "share_unreliable": float(k > KHAT_UNRELIABLE), "share_unstable": 0.0,
            "verdict": verdict}
