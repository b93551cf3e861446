"""Simultaneous confidence bands for the ECDF of M uniform values (Säilynoja, Bürkner & Vehtari
2022, "Graphical test for discrete uniformity and its applications in goodness-of-fit
evaluation and multiple sample comparison", their simulation method).

At grid points z_i = i / K the count of values below z_i is Binomial(M, z_i).  A pointwise band
at level gamma takes each count's central 1 - gamma interval; gamma is chosen, by simulating
uniform samples, so that the whole ECDF stays inside every interval with probability 1 - alpha:
gamma is the alpha-quantile over the simulations of the smallest two-sided pointwise tail
probability.  Returned as ECDF - z (the ECDF-difference plot's band).
"""

from __future__ import annotations

import torch


def _binomial_cdfs(m: int, z: torch.Tensor) -> torch.Tensor:
    """P(Binomial(m, z_i) <= c) for c = 0..m, ``[K, m + 1]`` (float64, by the log pmf)."""
    c = torch.arange(m + 1, dtype=torch.float64)
    log_choose = torch.lgamma(torch.tensor(m + 1.0, dtype=torch.float64)) - torch.lgamma(c + 1) \
        - torch.lgamma(m - c + 1)
    z = z.double().unsqueeze(1)
    log_pmf = log_choose + c * z.log() + (m - c) * torch.log1p(-z)
    return log_pmf.exp().cumsum(1).clamp(max=1.0)


def ecdf_difference_band(m: int, grid: int = 100, alpha: float = 0.05, simulations: int = 2000,
                         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z, lower, upper)``: the grid z_1..z_{K-1} and the simultaneous 1 - alpha band of
    ECDF(z) - z for ``m`` uniform values."""
    z = torch.arange(1, grid, dtype=torch.float64) / grid
    cdf = _binomial_cdfs(m, z)  # [K-1, m+1]
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(simulations, m, generator=generator, dtype=torch.float64)
    counts = (u.unsqueeze(1) < z.unsqueeze(1)).sum(-1)  # [S, K-1]
    rows = torch.arange(len(z)).expand_as(counts)
    below = cdf[rows, counts]
    above = 1 - torch.where(counts > 0, cdf[rows, (counts - 1).clamp(min=0)],
                            torch.zeros((), dtype=torch.float64))
    tail = (2 * torch.minimum(below, above)).clamp(max=1.0).min(1).values
    gamma = float(torch.quantile(tail, alpha))
    # The central 1 - gamma interval of each count: smallest c with cdf >= gamma / 2, and the
    # smallest c with cdf >= 1 - gamma / 2.
    low = torch.searchsorted(cdf.contiguous(), torch.full((len(z), 1), gamma / 2,
                                                          dtype=torch.float64)).squeeze(1)
    high = torch.searchsorted(cdf.contiguous(), torch.full((len(z), 1), 1 - gamma / 2,
                                                           dtype=torch.float64)).squeeze(1)
    return z, low.double() / m - z, high.clamp(max=m).double() / m - z


def outside_band(values: torch.Tensor, z: torch.Tensor, lower: torch.Tensor,
                 upper: torch.Tensor) -> bool:
    """Whether the ECDF of ``values`` (in [0, 1]) leaves the band anywhere."""
    ecdf = (values.double().unsqueeze(1) < z.unsqueeze(0)).double().mean(0)
    difference = ecdf - z
    return bool(((difference < lower - 1e-12) | (difference > upper + 1e-12)).any())

