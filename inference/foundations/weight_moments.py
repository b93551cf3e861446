"""Importance weights reduced as they come, so that memory stays bounded in K.

An estimate of log p(x) from K draws needs no more than sums over the draws: log-mean-exp is a
running maximum and the sums of w and w^2 beside it; the delta-method standard errors, the ESS
and the control variate of the ELBO are sums of products of w, the ELBO terms e_k and their
Monte Carlo KL deviations c_k = e_k - log w_k.  PSIS fits only the largest
ceil(min(K/5, 3 sqrt(K))) + 1 log-weights, which a running top-k keeps.  So a point's K = 10^7
draws cost O(sqrt(K)) memory, not O(K), and each formula below is the plain one over the
whole array rearranged (tests compare them on the same draws).

Sums are in float64, each ELBO-like term shifted by its first chunk's mean so that sums of
squares do not cancel.
"""

from __future__ import annotations

import math

import torch

from .psis import MIN_SAMPLES_KHAT, khat_from_tail, tail_length

# The ELBO's control variate is fitted on the draws themselves, which biases it by O(1/K):
# only from this many draws on.
MIN_SAMPLES_CONTROL_VARIATE = 20


class WeightMoments:
    """Running sums over the particles of each row (a data point, or a data set):
    ``add(log_w, elbo=None, reconstruction=None)`` with ``[k, rows]`` chunks, then the
    estimates.  ``num_samples`` is the K the chunks add up to (it fixes the tail's length);
    with ``keep_log_weights`` the log-weights are kept whole as well (``log_weights()``)."""

    def __init__(self, num_samples: int, keep_log_weights: bool = False):
        self.count = 0
        self.tail_length = tail_length(num_samples)
        self.sums: dict[str, torch.Tensor] = {}
        self.shift: dict[str, torch.Tensor] = {}
        self.kept: list[torch.Tensor] | None = [] if keep_log_weights else None

    def add(self, log_w: torch.Tensor, elbo: torch.Tensor | None = None,
            reconstruction: torch.Tensor | None = None,
            elbo_log_weight: torch.Tensor | None = None) -> None:
        """``elbo_log_weight``: what the Monte Carlo KL deviation c = e - log w is centred on
        where the log-weight's own mean is no ELBO (a weight summed over discrete values)."""
        lw = log_w.detach().double()
        if self.kept is not None:
            self.kept.append(log_w)
        if self.count == 0:
            rows = lw.shape[1:]
            self.max = torch.full(rows, -math.inf, dtype=torch.float64, device=lw.device)
            self.min = torch.full(rows, math.inf, dtype=torch.float64, device=lw.device)
            self.top = lw[:0]
        self.count += lw.shape[0]
        new_max = torch.maximum(self.max, lw.max(0).values)
        # exp(old max - new max): 0 before any finite weight, 1 while none is finite.
        rescale = torch.where(torch.isfinite(new_max), (self.max - new_max).exp(),
                              torch.ones_like(new_max))
        w = torch.where(torch.isfinite(new_max), (lw - new_max).exp(), torch.zeros_like(lw))
        self.max, self.min = new_max, torch.minimum(self.min, lw.min(0).values)
        self._scaled("w", w.sum(0), rescale)
        self._scaled("w2", w.pow(2).sum(0), rescale.pow(2))
        self.top = torch.cat([self.top, lw]).topk(
            min(self.tail_length, self.top.shape[0] + lw.shape[0]), dim=0).values
        if elbo is not None:
            e = self._shifted("e", elbo.detach().double())
            centre = lw if elbo_log_weight is None else elbo_log_weight.detach().double()
            c = self._shifted("c", elbo.detach().double() - centre)
            for name, value in (("e", e), ("c", c), ("ee", e * e), ("cc", c * c),
                                ("ec", e * c)):
                self._add(name, value.sum(0))
            self._scaled("we", (w * e).sum(0), rescale)
            self._scaled("wc", (w * c).sum(0), rescale)
        if reconstruction is not None:
            r = self._shifted("r", reconstruction.detach().double())
            self._add("r", r.sum(0))
            self._add("rr", (r * r).sum(0))

    def _shifted(self, name: str, value: torch.Tensor) -> torch.Tensor:
        if name not in self.shift:
            finite = torch.where(torch.isfinite(value), value, torch.zeros_like(value))
            self.shift[name] = finite.mean(0)
        return value - self.shift[name]

    def _add(self, name: str, value: torch.Tensor) -> None:
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def _scaled(self, name: str, value: torch.Tensor, rescale: torch.Tensor) -> None:
        self.sums[name] = self.sums[name] * rescale + value if name in self.sums else value

    # -- estimates -------------------------------------------------------------------------

    def log_weights(self) -> torch.Tensor | None:
        """Every log-weight added, ``[K, rows]``, where they were kept (else None)."""
        return torch.cat(self.kept) if self.kept is not None else None

    def log_mean_exp(self) -> torch.Tensor:
        """log of the mean weight: the importance-sampling estimate of log p(x)."""
        return self.max + self.sums["w"].log() - math.log(self.count)

    def ess(self) -> torch.Tensor:
        """(sum w)^2 / sum w^2."""
        return self.sums["w"].pow(2) / self.sums["w2"]

    def _relative_variance(self) -> torch.Tensor:
        """The sample variance of w / mean(w)."""
        k = self.count
        return (self.sums["w2"] * k * k / self.sums["w"].pow(2) - k) / (k - 1)

    def log_mean_exp_se(self) -> torch.Tensor:
        """The delta-method standard error of ``log_mean_exp``: sd(w / mean w) / sqrt(K)."""
        if self.count < 2:
            return torch.full_like(self.max, math.nan)
        return (self._relative_variance().clamp_min(0) / self.count).sqrt()

    def control_variate(self) -> torch.Tensor:
        """gamma of the ELBO terms e_k - gamma c_k: the least-squares coefficient of e on c,
        0 below ``MIN_SAMPLES_CONTROL_VARIATE`` draws."""
        k, s = self.count, self.sums
        if k < MIN_SAMPLES_CONTROL_VARIATE:
            return torch.zeros_like(self.max)
        var_c = s["cc"] - s["c"].pow(2) / k
        cov = s["ec"] - s["e"] * s["c"] / k
        return torch.where(var_c > 0, cov / var_c.clamp_min(1e-300), torch.zeros_like(var_c))

    def elbo(self) -> dict[str, torch.Tensor]:
        """The ELBO (with its control variate), its standard error, and the evidence gap's."""
        k, s, gamma = self.count, self.sums, self.control_variate()
        mean = (s["e"] - gamma * s["c"]) / k + self.shift["e"] - gamma * self.shift["c"]
        if k < 2:
            nan = torch.full_like(mean, math.nan)
            return {"elbo": mean, "elbo_se": nan, "evidence_gap_se": nan}
        var_e = (s["ee"] - s["e"].pow(2) / k - 2 * gamma * (s["ec"] - s["e"] * s["c"] / k)
                 + gamma.pow(2) * (s["cc"] - s["c"].pow(2) / k)) / (k - 1)
        # sum over draws of (w / mean w - 1)(e_k - mean e): the shifts cancel.
        w_mean = s["w"] / k
        cov = ((s["we"] - gamma * s["wc"]) / w_mean - (s["e"] - gamma * s["c"])) / (k - 1)
        gap_var = (self._relative_variance() + var_e - 2 * cov).clamp_min(0)
        return {"elbo": mean, "elbo_se": (var_e.clamp_min(0) / k).sqrt(),
                "evidence_gap_se": (gap_var / k).sqrt()}

    def reconstruction(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean reconstruction term and its standard error."""
        k, s = self.count, self.sums
        mean = s["r"] / k + self.shift["r"]
        if k < 2:
            return mean, torch.full_like(mean, math.nan)
        var = (s["rr"] - s["r"].pow(2) / k) / (k - 1)
        return mean, (var.clamp_min(0) / k).sqrt()

    def khat(self) -> torch.Tensor:
        """Pareto k-hat of each row's weights, as ``elbogap.foundations.psis.pareto_khat``
        computes it from the whole array; NaN below ``MIN_SAMPLES_KHAT`` draws."""
        if self.count < MIN_SAMPLES_KHAT:
            return torch.full_like(self.max, math.nan).cpu()
        return khat_from_tail(self.top, self.max, self.min, self.count)
