"""Held-out points of a pair with global latent variables: the posterior predictive density.

The evidence gap of a global-latent pair is about the data its guide was fitted to.  A point
the guide never saw has no gap; what it has is the log posterior predictive density under the
guide,

    log p_q(x_new) = log E_{theta ~ q(theta)} [ p(x_new | theta) ],

with p(x_new | theta) = E_{z ~ q(z | x_new, theta)} [p(x_new, z | theta) / q(z | x_new, theta)]
when the point has local latents.  Each of K draws theta_k (with z_k) gives the weight
w_k = log p(x_new, z_k | theta_k) - log q(z_k | x_new, theta_k); the estimate is
log (1/K) sum_k exp(w_k), unbiased inside the log like the evidence, with the same delta-method
standard error, k-hat and ESS.  The global sites' own terms do not enter: theta is drawn from
q(theta), not weighted towards a posterior.

A model with no data plate (Pyro's eight schools) observes x as one whole: x_new is then one
observation, w_k = log p(x_new | theta_k) with every latent variable in theta, and the result
has one "point".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..foundations.conventions import inspect_pair
from ..foundations.data_plate import takes_program_arguments
from ..foundations.device import rows_per_chunk as default_rows_per_chunk
from ..foundations.module_mode import evaluation_mode
from ..foundations.program_data import ProgramData
from ..foundations.psis import MIN_SAMPLES_KHAT, importance_ess, khat_summary, khat_where_defined
from ..foundations.statistics import importance_stats, mean_and_se
from .passes import checked_arguments, first_layout, joint_chunks


@dataclass
class PosteriorPredictive:
    """Per held-out point ``[N]``: log p_q(x_n) and its Monte Carlo SE, k-hat and ESS."""

    log_density: torch.Tensor
    log_density_se: torch.Tensor
    khat: torch.Tensor
    ess: torch.Tensor
    num_samples: int
    whole: bool = False  # x_new observed as one whole (a model without a data plate)

    def summary(self) -> dict:
        out = {
            "name": "log posterior predictive density log E_q(theta)[p(x | theta)]" + (
                " of x_new as one observation (the model has no data plate)" if self.whole
                else ""),
            "num_data": int(self.log_density.shape[0]),
            "num_samples": self.num_samples,
            "log_density": mean_and_se(self.log_density),
            "total": float(self.log_density.sum()),
            "ess": {"mean": float(self.ess.mean()), "min": float(self.ess.min())},
        }
        if self.num_samples >= MIN_SAMPLES_KHAT:
            out["khat"] = khat_summary(self.khat, ess=self.ess, num_samples=self.num_samples,
                                       subject="predictive density")
        return out


@takes_program_arguments
def posterior_predictive(
    model: Callable,
    guide: Callable,
    x_new: ProgramData,
    *,
    num_samples: int,
    batch_size: int | None = None,
    data_plate: str | None = None,
    rows_per_chunk: int | None = None,
) -> PosteriorPredictive:
    """log E_q(theta)[p(x_n | theta)] for each held-out point of a pair with global latents
    (for a pair of local latents only it equals the evidence ``evaluate`` reports); for a model
    without a data plate, of x_new as one observation."""
    batch_size = checked_arguments(x_new, num_samples, batch_size, "posterior_predictive")
    rows_per_chunk = rows_per_chunk or default_rows_per_chunk(x_new.device)
    with torch.no_grad(), evaluation_mode(model, guide):
        first, batch_size = first_layout(model, guide, x_new, batch_size, data_plate)
        whole = all(name in first.global_sites for name in first.observed)
        if whole:
            # x_new is one observation: a pass must hold all of it.
            batch_size = x_new.shape[0]
            first = inspect_pair(model, guide, x_new, data_plate)
        chunks = []
        for _, batches in joint_chunks(model, guide, x_new, first, batch_size, num_samples,
                                       data_plate, rows_per_chunk, progress=False):
            chunks.append(torch.cat([terms.global_reconstruction.unsqueeze(1) if whole
                                     else terms.log_weight for *_, terms in batches], dim=1))
    log_w = torch.cat(chunks).cpu()
    stats = importance_stats(log_w, log_w)
    return PosteriorPredictive(
        log_density=stats["log_evidence"],
        log_density_se=stats["log_evidence_se"],
        khat=khat_where_defined(log_w),
        ess=importance_ess(log_w),
        num_samples=num_samples,
        whole=whole,
    )
