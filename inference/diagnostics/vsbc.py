"""VSBC (Yao, Vehtari, Simpson & Gelman 2018, "Yes, but did it work?", Algorithm 2): calibration
of a guide that is fitted to one data set (global latents, autoguides), by refitting it.

For m = 1..M: theta*_m ~ p(theta), y_m ~ p(y | theta*_m) from the program itself (every observed
site uncondition-ed); the guide's parameters, started at their fitted values, are refitted by
SVI to y_m (the model's own parameters held fixed); then, per scalar coordinate k of every latent
site, p_mk = Pr_q(theta_k < theta*_mk), the share of the refitted guide's draws below the truth.
Where q is unbiased the distribution of p_.k is symmetric about 1/2, and Yao et al. test it with
a two-sample Kolmogorov-Smirnov test of {p_mk} against {1 - p_mk} (the statistic is
``scipy.stats.ks_2samp``'s); the p-values here are from Kolmogorov's limiting distribution at
sqrt(M / 2) D (a little larger than ``ks_2samp(method="asymp")``'s, which takes the one-sample
statistic's distribution at n = M / 2), with Holm's correction across coordinates (which
NumPyro's ``vsbc_diagnostic`` leaves out).  The guide's parameters are put back afterwards.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from ..foundations.conventions import inspect_pair
from ..foundations.data_plate import takes_program_arguments
from ..foundations.distributed import SINGLE, Distributed, over_point_groups
from ..foundations.errors import ConventionError, OptionError
from ..foundations.minimize import minimize, restored
from ..foundations.module_mode import evaluation_mode
from ..foundations.program_data import ProgramData
from ..foundations.progress import tqdm
from .calibration import CALIBRATED, guide_draws_per_point, holm, require_latent, simulated


@dataclass
class VSBC:
    """Per latent site ``[M, D]``: p_mk = Pr_q(theta_k < theta*_mk) of each refit; per
    coordinate the KS statistic of p against 1 - p, its p-value and Holm's adjusted one."""

    probabilities: dict[str, torch.Tensor]
    ks_stat: dict[str, torch.Tensor]
    p_value: dict[str, torch.Tensor]
    p_adjusted: dict[str, torch.Tensor]
    level: float
    num_steps: int
    num_draws: int
    seconds_per_refit: float

    def verdict(self, site: str) -> list[str]:
        """"calibrated", or the side q leans to: "biased low" where the truth sits mostly above
        q's draws (p piled near 1), "biased high" where below."""
        out = []
        for d, p in enumerate(self.p_adjusted[site].tolist()):
            if p >= self.level:
                out.append(CALIBRATED)
            else:
                out.append("biased low" if self.probabilities[site][:, d].median() > 0.5
                           else "biased high")
        return out

    def summary(self) -> dict:
        sites = {name: [{"dim": d, "ks_stat": float(self.ks_stat[name][d]),
                         "p_value": float(self.p_value[name][d]),
                         "p_adjusted": float(self.p_adjusted[name][d]), "verdict": v}
                        for d, v in enumerate(self.verdict(name))]
                 for name in self.probabilities}
        return {"method": "vsbc", "num_simulations": next(iter(
            self.probabilities.values())).shape[0], "num_steps": self.num_steps,
            "num_draws": self.num_draws, "level": self.level, "correction": "holm",
            "seconds_per_refit": self.seconds_per_refit, "sites": sites,
            "miscalibrated": [f"{n}[{d['dim']}]: {d['verdict']}" for n, dims in sites.items()
                              for d in dims if d["verdict"] != CALIBRATED]}


@takes_program_arguments
def vsbc(
    model: Callable,
    guide: Callable,
    x_like: ProgramData,
    *,
    num_simulations: int = 100,
    num_steps: int = 500,
    num_draws: int = 1000,
    lr: float = 0.01,
    level: float = 0.05,
    data_plate: str | None = None,
    seed: int | None = None,
    progress: bool = False,
    distributed: Distributed = SINGLE,
) -> VSBC:
    """VSBC of ``guide``: ``num_simulations`` data sets simulated on arguments shaped as
    ``x_like``, the guide refitted to each by ``num_steps`` Adam steps at ``lr`` (from its
    current parameters), ``num_draws`` draws of each refit.  With ``progress``, a bar and the
    time it will take, measured on the first refit.  Under torchrun (``distributed``) the
    refits are dealt to the processes, every one getting all the results; a refit's numbers
    depend on the seed and its index alone, so on neither the number of processes nor the
    order."""
    for name, value in (("num_simulations", num_simulations), ("num_steps", num_steps),
                        ("num_draws", num_draws)):
        if not (isinstance(value, int) and value >= 2):
            raise OptionError(name, f"must be an integer >= 2, got {value!r}")
    seed = distributed.common_seed(seed)
    with evaluation_mode(model, guide):
        layout = inspect_pair(model, guide, x_like, data_plate)
        require_latent(layout)
        with poutine.trace(param_only=True) as params:
            guide(x_like)
        tensors = [site["value"].unconstrained() for site in params.trace.nodes.values()]
        if not tensors:
            raise ConventionError("the guide has no parameters (pyro.param) to refit")
        elbo = Trace_ELBO(vectorize_particles=False, max_plate_nesting=layout.max_plate_nesting)
        bar = tqdm(total=num_simulations, desc="VSBC refits", unit="refit",
                   disable=not (progress and distributed.is_main))
        started = time.perf_counter()

        def refit(m: int, _: int) -> dict[str, torch.Tensor]:
            conditioned, data, truth = simulated(model, x_like, data_plate).rows(
                0, x_like.shape[0])
            with restored(tensors):
                minimize(lambda: elbo.differentiable_loss(conditioned, guide, data), tensors,
                         steps=num_steps, lr=lr)
                with torch.no_grad():
                    draws = guide_draws_per_point(guide, data, layout, num_draws, data_plate)
                    below = {name: (values.reshape(num_draws, -1) < truth[name].reshape(-1))
                             .double().mean(0) for name, values in draws.items()}
            if bar.n == 0 and progress and distributed.is_main:
                each = time.perf_counter() - started
                share = math.ceil(num_simulations / distributed.world_size)
                bar.write(f"VSBC: {num_simulations} refits of {num_steps} steps, about "
                          f"{each * share:.0f} s ({each:.2f} s each, {share} per process)")
            bar.update(distributed.world_size if distributed.enabled else 1)
            return below

        try:
            # One simulation a group, each seeded by the seed and its index: the same numbers
            # for any number of processes.
            refits = over_point_groups(refit, num_simulations, 1, seed, "vsbc", distributed,
                                       x_like.device)
        finally:
            bar.close()
    # Each process refitted its share: the time of one refit, not the wall time per refit.
    seconds = (time.perf_counter() - started) * distributed.world_size / num_simulations
    probabilities = {name: torch.stack([r[name] for r in refits]) for name in layout.latent}
    ks, pv = {}, {}
    for name, p in probabilities.items():
        ks[name] = torch.stack([ks_two_sample(p[:, d], 1 - p[:, d]) for d in range(p.shape[1])])
        pv[name] = kolmogorov_sf(ks[name] * math.sqrt(p.shape[0] / 2))
    return VSBC(probabilities, ks, pv, holm(pv), level, num_steps, num_draws, seconds)


def ks_two_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sup_t |F_a(t) - F_b(t)| of two samples' empirical distribution functions."""
    points = torch.cat([a, b]).sort().values
    fa = torch.searchsorted(a.sort().values.contiguous(), points, right=True).double() / len(a)
    fb = torch.searchsorted(b.sort().values.contiguous(), points, right=True).double() / len(b)
    return (fa - fb).abs().max()


def kolmogorov_sf(x: torch.Tensor) -> torch.Tensor:
    """P(K > x) of Kolmogorov's distribution: 2 sum_k (-1)^(k-1) exp(-2 k^2 x^2)."""
    k = torch.arange(1, 101, dtype=torch.float64)
    x = x.double().unsqueeze(-1)
    terms = 2 * (-1) ** (k - 1) * torch.exp(-2 * k**2 * x**2)
    return torch.where(x.squeeze(-1) > 0, terms.sum(-1).clamp(0, 1), torch.ones(()))
