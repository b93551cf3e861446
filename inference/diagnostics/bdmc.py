"""BDMC (Grosse, Ghahramani & Adams 2015): AIS run on data simulated from the model.  Forward from
the base it gives a stochastic lower bound of log p(x); reverse, started at the latents that
generated the data (exact posterior samples), a stochastic upper bound.  The bracket says how far
an AIS setting is from the true log p(x) on data like the user's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro import poutine
from pyro.distributions import Unit

from ..foundations.data_plate import takes_program_arguments
from ..foundations.enumeration import marked_for_enumeration
from ..foundations.errors import ConventionError
from ..foundations.module_mode import evaluation_mode
from ..foundations.program_data import ProgramData
from ..foundations.statistics import log_mean_exp_with_se, mean_and_se
from ..foundations.traces import sample_sites
from .ais import anneal, annealing_path, initial_state, points_per_pass, sigmoid_schedule


@dataclass
class BidirectionalBounds:
    """BDMC on simulated data: per point, a stochastic lower bound (forward AIS) and upper bound
    (reverse AIS from the simulating latents) of log p(x)."""

    observations: dict[str, torch.Tensor]  # the simulated data, by observed site
    lower: torch.Tensor
    upper: torch.Tensor
    num_chains: int
    num_steps: int
    # Monte Carlo SEs of the two bounds (delta method over the chains' weights).
    lower_se: torch.Tensor | None = None
    upper_se: torch.Tensor | None = None

    def summary(self) -> dict:
        bracket = mean_and_se(self.upper - self.lower)
        out = {"method": "bdmc", "num_data": len(self.lower), "num_chains": self.num_chains,
               "num_steps": self.num_steps, "lower": self.lower.double().mean().item(),
               "upper": self.upper.double().mean().item(), "bracket": bracket["mean"],
               "bracket_se": bracket["se"]}
        if self.lower_se is not None and len(self.lower) == 1:
            # One bracket (a data set): the bounds' own Monte Carlo SEs over the chains.
            out["lower_se"] = self.lower_se.item()
            out["upper_se"] = self.upper_se.item()
        return out


def simulate(model: Callable, data: ProgramData) -> tuple[
        Callable, ProgramData, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Observations drawn from the generative program (every observed site uncondition-ed) on
    the program's arguments ``data``: the model conditioned on them instead of the user's, the
    arguments with each one an observed site holds as it is (``obs=x``) replaced by its
    simulation (so that an encoder sees the simulated x), the observations, and the latents
    that generated them."""
    # A model that sums discrete states out draws them here: the data are simulated from the
    # whole program, and only its continuous latents start the reverse chains.
    drawing = getattr(model, "unenumerated", model)
    with torch.no_grad():
        conditioned = sample_sites(poutine.trace(drawing).get_trace(data))
        sites = sample_sites(poutine.trace(poutine.uncondition(drawing)).get_trace(data))
    observed = [name for name, s in conditioned.items() if s["is_observed"]]
    factors = [name for name in observed if isinstance(conditioned[name]["fn"], Unit)]
    if factors:
        raise ConventionError(
            f"BDMC simulates the model's observations, but site(s) {factors} are factors "
            "(pyro.factor): a factor is a weight, not a distribution to draw from")
    simulated = {name: sites[name]["value"] for name in observed}
    summed = drawing is not model
    latents = {name: s["value"] for name, s in sites.items()
               if name not in observed and not (summed and marked_for_enumeration(s))}
    replaced = {id(conditioned[name]["value"]): value for name, value in simulated.items()}
    data = data.replaced(lambda value: replaced.get(id(value), value))
    return (poutine.condition(poutine.uncondition(model), data=simulated), data, simulated,
            latents)


@takes_program_arguments
def bdmc(
    model: Callable,
    guide: Callable,
    x_like: ProgramData,
    *,
    num_chains: int = 16,
    num_steps: int = 500,
    leapfrog_steps: int = 10,
    start: str = "guide",
    step_size: float = 0.01,
    batch_size: int | None = None,
    data_plate: str | None = None,
    progress: bool = False,
    train_mode: bool = False,
) -> BidirectionalBounds:
    """Simulate ``len(x_like)`` points from the model and bracket their log p(x) with forward
    and reverse AIS of the same setting (``batch_size`` points simulated and annealed at a
    time, as in ``annealed_evidence``; a pair with global latents simulates its data set whole
    and gets one bracket for log p(x_1..N)).  The pair's modules are in evaluation mode
    throughout, unless ``train_mode``."""
    with evaluation_mode(model, guide, train_mode):
        batch_size, _ = points_per_pass(model, guide, x_like, num_chains, start, data_plate,
                                        batch_size, "bdmc", num_steps, leapfrog_steps,
                                        step_size)
        xs, lowers, uppers, lower_ses, upper_ses = [], [], [], [], []
        for s in range(0, x_like.shape[0], batch_size):
            xb = x_like[s: s + batch_size]
            simulated_model, xb, x, exact = simulate(model, xb)
            path = annealing_path(simulated_model, guide, xb, num_chains, start, data_plate)
            forward, *_ = anneal(path, initial_state(path, start), sigmoid_schedule(num_steps),
                                 leapfrog_steps, step_size, progress, "forward AIS")
            # Every chain starts at the latents that generated x: exact posterior draws.
            reverse, *_ = anneal(path, path.state_at(exact), sigmoid_schedule(num_steps).flip(0),
                                 leapfrog_steps, step_size, progress, "reverse AIS")
            xs.append(x)
            lower, lower_se = log_mean_exp_with_se(forward.cpu())
            # Reverse weights estimate 1 / p(x): minus their log-mean-exp bounds log p(x) above.
            upper, upper_se = log_mean_exp_with_se(reverse.cpu())
            lowers.append(lower)
            uppers.append(-upper)
            lower_ses.append(lower_se)
            upper_ses.append(upper_se)
    observations = xs[0] if len(xs) == 1 else {n: torch.cat([x[n] for x in xs]) for n in xs[0]}
    return BidirectionalBounds(observations=observations, lower=torch.cat(lowers),
                               upper=torch.cat(uppers), num_chains=num_chains,
                               num_steps=num_steps, lower_se=torch.cat(lower_ses),
                               upper_se=torch.cat(upper_ses))
