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
from ..foundations.distributed import SINGLE, Distributed
from ..foundations.enumeration import marked_for_enumeration
from ..foundations.errors import ConventionError, OptionError
from ..foundations.keyed_noise import stream_key
from ..foundations.module_mode import evaluation_mode
from ..foundations.program_data import ProgramData
from ..foundations.rng import seeded
from ..foundations.statistics import log_mean_exp_with_se, mean_and_se
from ..foundations.traces import data_dim, sample_sites
from .ais import anneal, annealing_path, points_per_pass, sigmoid_schedule


@dataclass
class BidirectionalBounds:
    """BDMC on simulated data: per point, a stochastic lower bound (forward AIS) and upper bound
    (reverse AIS from the simulating latents) of log p(x); for a pair with global latents, per
    simulated data set (``data_sets`` of them, ``points`` points each)."""

    # The simulated data, by observed site (with global latents, every data set's stacked on a
    # leading dimension).
    observations: dict[str, torch.Tensor]
    lower: torch.Tensor
    upper: torch.Tensor
    num_chains: int
    num_steps: int
    # Monte Carlo SEs of the two bounds (delta method over the chains' weights).
    lower_se: torch.Tensor | None = None
    upper_se: torch.Tensor | None = None
    # With global latents: how many data sets were simulated, of how many points.
    data_sets: int | None = None
    points: int | None = None

    def summary(self) -> dict:
        bracket = mean_and_se(self.upper - self.lower)
        out = {"method": "bdmc", "num_data": len(self.lower), "num_chains": self.num_chains,
               "num_steps": self.num_steps, "lower": self.lower.double().mean().item(),
               "upper": self.upper.double().mean().item(), "bracket": bracket["mean"],
               "bracket_se": bracket["se"]}
        if self.data_sets is not None:
            out.update(num_data=self.points, data_sets=self.data_sets)
        out["check"] = bracket_check(bracket["mean"], bracket["se"])
        return out


# A bracket below zero by more than this many of its SEs is no Monte Carlo noise.
CROSSING_SES = 3.0


def bracket_check(bracket: float | None, se: float | None) -> str:
    """"passed" (the bracket is at or above zero), "inside the noise" (below zero by less than
    ``CROSSING_SES`` SEs), "failed" (below by more), or "unknown" (below, with no SE to say)."""
    if bracket is None:
        return "unknown"
    if bracket >= 0:
        return "passed"
    if se is None:
        return "unknown"
    return "inside the noise" if -bracket <= CROSSING_SES * se else "failed"


@dataclass
class Simulation:
    """Observations drawn from the generative program (every observed site uncondition-ed) on
    the program's arguments, the latents that generated them, and each value's dimension that
    indexes data points (None: the value is the data set's)."""

    model: Callable  # the user's, to condition on a slice of the observations
    data: ProgramData  # the arguments, each one an observed site holds as is (obs=x) simulated
    observations: dict[str, torch.Tensor]
    latents: dict[str, torch.Tensor]
    point_dims: dict[str, int | None]

    def rows(self, start: int, stop: int) -> tuple[Callable, ProgramData, dict[str, torch.Tensor]]:
        """Points ``start .. stop - 1``: the model conditioned on their simulated observations
        (so that an encoder sees the simulated x), their arguments, their latents."""
        def part(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {name: v if self.point_dims[name] is None
                    else v.narrow(self.point_dims[name], start, stop - start)
                    for name, v in values.items()}

        conditioned = poutine.condition(poutine.uncondition(self.model),
                                        data=part(self.observations))
        return conditioned, self.data[start:stop], part(self.latents)


def simulate(model: Callable, data: ProgramData, data_plate: str | None) -> Simulation:
    """Draw the observations of ``model`` on its arguments ``data`` (see ``Simulation``)."""
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
    return Simulation(model, data, simulated, latents,
                      {name: data_dim(s, s["value"], data_plate) for name, s in sites.items()})


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
    seed: int | None = None,
    distributed: Distributed = SINGLE,
    data_sets: int = 4,
) -> BidirectionalBounds:
    """Simulate ``len(x_like)`` points from the model and bracket their log p(x) with forward
    and reverse AIS of the same setting (``batch_size`` points annealed at a time, as in
    ``annealed_evidence``; a pair with global latents gets one bracket for log p(x_1..N)).
    The data are simulated whole from ``seed`` and every chain is keyed by its point, so the
    bounds do not depend on the batch size or on how many torchrun processes share the points
    (``distributed``).  The pair's modules are in evaluation mode throughout, unless
    ``train_mode``.

    A pair with global latents is simulated ``data_sets`` times, one bracket each: the reverse
    chains of one data set all start at its one simulating latent, so only independent data
    sets give the upper bound an honest SE.  ``summary()["check"]`` reads the bracket: "failed"
    where the upper bound lies below the lower by more than 3 SEs."""
    seed = distributed.common_seed(seed)
    if not (isinstance(data_sets, int) and data_sets >= 2):
        raise OptionError("data_sets", f"must be an integer >= 2, got {data_sets!r}")
    with evaluation_mode(model, guide, train_mode):
        batch_size, path = points_per_pass(model, guide, x_like, num_chains, start, data_plate,
                                           batch_size, "bdmc", num_steps, leapfrog_steps,
                                           step_size)
        betas = sigmoid_schedule(num_steps)
        show = progress and distributed.is_main
        if not path.layout.per_datapoint:
            return _data_sets(model, guide, x_like, seed, data_sets, betas, num_chains, start,
                              data_plate, leapfrog_steps, step_size, show)
        with seeded(stream_key(seed, "bdmc/simulate"), x_like.device):
            simulation = simulate(model, x_like, data_plate)
        share = distributed.shard(x_like.shape[0])
        parts = []
        for s in range(share.start, share.stop, batch_size):
            parts.append(_bracket(simulation, s, min(s + batch_size, share.stop), guide, seed,
                                  betas, num_chains, start, data_plate, leapfrog_steps,
                                  step_size, show))
    gathered = distributed.gather(parts) if distributed.enabled else [parts]
    parts = [p for rank in gathered for p in rank]
    lower, upper, lower_se, upper_se = (torch.cat([p[i] for p in parts]) for i in range(4))
    return BidirectionalBounds(observations=simulation.observations, lower=lower, upper=upper,
                               num_chains=num_chains, num_steps=num_steps, lower_se=lower_se,
                               upper_se=upper_se)


def _bracket(simulation: Simulation, start_row: int, stop: int, guide: Callable, seed: int,
             betas: torch.Tensor, num_chains: int, start: str, data_plate: str | None,
             leapfrog_steps: int, step_size: float, show: bool) -> tuple[torch.Tensor, ...]:
    """Forward and reverse AIS on rows ``start_row .. stop - 1`` of a simulation: (lower,
    upper, their SEs over the chains)."""
    forward_key, reverse_key = stream_key(seed, "bdmc/forward"), stream_key(seed, "bdmc/reverse")
    simulated_model, xb, exact = simulation.rows(start_row, stop)
    path = annealing_path(simulated_model, guide, xb, num_chains, start, data_plate)
    u = path.initial_state(forward_key, start_row)
    forward, *_ = anneal(path, u, betas, leapfrog_steps, step_size, show, "forward AIS",
                         path.noise(forward_key, start_row, u))
    # Every chain starts at the latents that generated x: exact posterior draws.
    u = path.state_at(exact)
    reverse, *_ = anneal(path, u, betas.flip(0), leapfrog_steps, step_size, show, "reverse AIS",
                         path.noise(reverse_key, start_row, u))
    lower, lower_se = log_mean_exp_with_se(forward.cpu())
    # Reverse weights estimate 1 / p(x): minus their log-mean-exp bounds log p(x) above.
    upper, upper_se = log_mean_exp_with_se(reverse.cpu())
    return lower, -upper, lower_se, upper_se


def _data_sets(model: Callable, guide: Callable, x_like: ProgramData, seed: int, data_sets: int,
               betas: torch.Tensor, num_chains: int, start: str, data_plate: str | None,
               leapfrog_steps: int, step_size: float, show: bool) -> BidirectionalBounds:
    """BDMC for a pair with global latents: one bracket per simulated data set.  All reverse
    chains of a data set start at its one simulating latent, so their spread says nothing of the
    upper bound's error; independent data sets do, and the bracket's SE is over them."""
    parts, simulations = [], []
    for r in range(data_sets):
        with seeded(stream_key(seed, f"bdmc/simulate/{r}"), x_like.device):
            simulation = simulate(model, x_like, None)
        simulations.append(simulation.observations)
        parts.append(_bracket(simulation, 0, x_like.shape[0], guide, stream_key(seed, str(r)),
                              betas, num_chains, start, data_plate, leapfrog_steps, step_size,
                              show))
    lower, upper, lower_se, _ = (torch.cat([p[i] for p in parts]) for i in range(4))
    observations = {name: torch.stack([o[name] for o in simulations])
                    for name in simulations[0]}
    return BidirectionalBounds(observations=observations, lower=lower, upper=upper,
                               num_chains=num_chains, num_steps=betas.shape[0] - 1,
                               lower_se=lower_se, data_sets=data_sets, points=x_like.shape[0])
