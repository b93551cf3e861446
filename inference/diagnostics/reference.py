"""The reference estimator: the plainest correct computation of what ``evaluate`` reports.

One particle at a time, with Pyro's own machinery: the guide traced on x, the model replayed on
its draws, and every sample site's ``log_prob`` with its mask (``site_log_prob``), summed per
data point over the site's other dimensions.  No particle plate, no closed-form KL, no control
variate, no chunks.  Per particle k and data point n (or, for a pair with global latents, per
data set):

    log w_kn   = sum of the model's sites - sum of the guide's latent and auxiliary sites
    recon_kn   = sum of the model's observed sites (and its factors)
    log q_kn, log p_kn    the guide's latent sites, the model's latent sites
    guide_kn   = the guide's observed sites and factors (no part of q; Pyro's Trace_ELBO
                 subtracts them)

It is slow by design and is the yardstick of the fast paths: the checks of the tests, and of the
random programs of ``tests/diagnostics/test_random_programs.py``, compare against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro.poutine.trace_struct import Trace

from ..foundations.data_plate import takes_program_arguments
from ..foundations.program_data import ProgramData
from ..foundations.traces import data_frame, sample_sites, site_log_prob, trace_pair


@dataclass
class ReferenceTerms:
    """Per particle and row ``[K, N]`` (rows: data points, or one for the data set)."""

    log_weight: torch.Tensor
    reconstruction: torch.Tensor
    log_q: torch.Tensor
    log_prior: torch.Tensor
    guide_observed: torch.Tensor

    @property
    def elbo(self) -> torch.Tensor:
        """The plain Monte Carlo ELBO per row: the mean log-weight."""
        return self.log_weight.mean(0)

    @property
    def log_evidence(self) -> torch.Tensor:
        return torch.logsumexp(self.log_weight, 0) - math.log(self.log_weight.shape[0])

    @property
    def kl_prior(self) -> torch.Tensor:
        """The Monte Carlo KL(q || p) per row: mean of log q - log p over the particles."""
        return (self.log_q - self.log_prior).mean(0)


def per_point(site: dict, values: torch.Tensor, data_plate: str,
              rows: int | None) -> torch.Tensor | None:
    """A site's batch-shaped ``values`` summed over every dimension but the data plate's: ``[N]``
    (``rows`` is N; None: one row for the data set, everything summed).  A site outside the
    data plate belongs to no point: None, unless the row is the data set's."""
    frame = data_frame(site, data_plate)
    if rows is None:
        return values.sum().reshape(1)
    if frame is None:
        return None
    batch = values.dim()
    if batch < -frame.dim:
        values = values.reshape((1,) * (-frame.dim - batch) + tuple(values.shape))
    out = values.movedim(values.dim() + frame.dim, 0).reshape(values.shape[frame.dim], -1)
    return out.sum(1).expand(rows)


def particle_terms(guide_trace: Trace, model_trace: Trace, data_plate: str,
                   rows: int | None) -> tuple[torch.Tensor, ...]:
    """One particle's (log w, recon, log q, log p, guide observed), each ``[rows]``."""
    size = 1 if rows is None else rows
    log_w, recon, log_q, log_p, guide_obs = (torch.zeros(size, dtype=torch.float64)
                                             for _ in range(5))
    model_names = set(sample_sites(model_trace))
    for name, site in sample_sites(model_trace).items():
        lp = per_point(site, site_log_prob(site).double(), data_plate, rows)
        if lp is None:
            raise ValueError(f"model site '{name}' is outside plate '{data_plate}': the pair's "
                             "unit is the data set (per_datapoint=False)")
        log_w = log_w + lp
        if site["is_observed"]:
            recon = recon + lp
        else:
            log_p = log_p + lp
    for name, site in sample_sites(guide_trace).items():
        lp = per_point(site, site_log_prob(site).double(), data_plate, rows)
        if site["is_observed"] and name not in model_names:
            if lp is not None:  # (a factor of the whole guide is no point's)
                guide_obs = guide_obs + lp
            continue
        if lp is None:
            raise ValueError(f"guide site '{name}' is outside plate '{data_plate}': the pair's "
                             "unit is the data set (per_datapoint=False)")
        log_w = log_w - lp
        log_q = log_q + lp
    return log_w, recon, log_q, log_p, guide_obs


@takes_program_arguments
def reference_terms(model: Callable, guide: Callable, x: ProgramData, *, num_samples: int,
                    data_plate: str | None = None, per_datapoint: bool = True,
                    guide_traces: list[Trace] | None = None) -> ReferenceTerms:
    """``num_samples`` particles of the pair on ``x``, one at a time; per data point, or with
    ``per_datapoint=False`` for the data set.  ``guide_traces`` replays given draws (one
    unvectorized guide trace per particle) instead of drawing new ones."""
    rows = x.shape[0] if per_datapoint else None
    parts = []
    with torch.no_grad(), pyro.validation_enabled(False):
        for k in range(num_samples if guide_traces is None else len(guide_traces)):
            replay = None if guide_traces is None else guide_traces[k]
            guide_trace, model_trace = trace_pair(model, guide, x, replay_guide=replay)
            parts.append(particle_terms(guide_trace, model_trace, data_plate, rows))
    return ReferenceTerms(*(torch.stack(t) for t in zip(*parts, strict=True)))
