"""Reading a model/guide pair through Pyro traces.

The conventions (see README): model and guide take the same arguments, the first a tensor ``x``
whose first dimension indexes data points; every per-datapoint sample site sits inside
``pyro.plate(data_plate, ...)``; the guide samples each latent site under the model's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from inference.errors import ConventionError
from inference.log_density import log_density

PARTICLE_PLATE = "_elbogap_particles"


@dataclass(frozen=True)
class PairLayout:
    """What a trace of the pair tells about its sites, found once and reused for every batch."""

    latent: tuple[str, ...]
    observed: tuple[str, ...]
    max_plate_nesting: int

    @property
    def particle_dim(self) -> int:
        # Left of every plate the pair declares, as Trace_ELBO's vectorize_particles does.
        return -(self.max_plate_nesting + 1)


def sample_sites(trace: Trace) -> dict[str, dict]:
    """Sample sites that carry probability: no deterministic or auxiliary bookkeeping sites."""
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site_is_subsample(site)
        and not site["infer"].get("_deterministic", False)
    }


def data_frame(site: dict, data_plate: str):
    """The ``CondIndepStackFrame`` of the data plate around ``site``, or None."""
    for frame in site["cond_indep_stack"]:
        if frame.name == data_plate:
            return frame
    return None


def trace_pair(
    model: Callable, guide: Callable, x: torch.Tensor, num_particles: int | None = None,
    particle_dim: int | None = None,
) -> tuple[Trace, Trace]:
    """Trace the guide on ``x`` and replay the model on the guide's latent values.

    With ``num_particles`` both run inside a plate of that size at ``particle_dim``, so every
    sample site gets a leading particle dimension.
    """
    def run() -> tuple[Trace, Trace]:
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
        return guide_trace, model_trace

    if num_particles is None:
        return run()
    with pyro.plate(PARTICLE_PLATE, num_particles, dim=particle_dim):
        return run()


def inspect_pair(
    model: Callable, guide: Callable, x: torch.Tensor, data_plate: str = "data"
) -> PairLayout:
    """Trace the pair once and check the conventions; raise ConventionError naming the site."""
    try:
        guide_trace = poutine.trace(guide).get_trace(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise ConventionError(f"the guide failed when called on x of shape {tuple(x.shape)}: "
                              f"{type(e).__name__}: {first_line(e)}") from e
    try:
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise ConventionError(
            "the model failed when replayed on the guide's samples: "
            f"{type(e).__name__}: {first_line(e)} (does the guide sample every latent site "
            "with the shape the model expects?)"
        ) from e
    model_sites = sample_sites(model_trace)
    guide_sites = sample_sites(guide_trace)
    latent = tuple(n for n, s in model_sites.items() if not s["is_observed"])
    observed = tuple(n for n, s in model_sites.items() if s["is_observed"])
    if not observed:
        raise ConventionError(
            "the model has no observed sample site: pass the data as obs=x to pyro.sample"
        )
    missing = [n for n in latent if n not in guide_sites]
    if missing:
        raise ConventionError(
            f"the guide does not sample the model's latent site(s) {missing}: a guide must "
            "sample every latent site under the same name as the model"
        )
    extra = [n for n in guide_sites if n not in model_sites]
    if extra:
        raise ConventionError(
            f"the guide samples site(s) {extra} that the model does not have; the evidence "
            "estimate needs q over exactly the model's latent sites"
        )
    for name in latent:
        expected = tuple(model_sites[name]["fn"].shape())
        got = tuple(guide_sites[name]["value"].shape)
        if expected != got:
            raise ConventionError(
                f"latent site '{name}': the guide samples shape {got} but the model's "
                f"distribution there has shape {expected}"
            )
    for where, sites in (("model", model_sites), ("guide", guide_sites)):
        for name, site in sites.items():
            if data_frame(site, data_plate) is None:
                raise ConventionError(
                    f"{where} site '{name}' is not inside pyro.plate('{data_plate}', ...): every "
                    "per-datapoint site must be, so that diagnostics can be reported per data "
                    "point (global latent variables are not supported)"
                )
    n = x.shape[0]
    for where, sites in (("model", model_sites), ("guide", guide_sites)):
        for name, site in sites.items():
            frame = data_frame(site, data_plate)
            if frame.size != n:
                raise ConventionError(
                    f"{where} site '{name}': plate '{data_plate}' has size {frame.size} but x has "
                    f"{n} rows; use pyro.plate('{data_plate}', x.shape[0])"
                )
    nesting = 0
    for site in list(model_sites.values()) + list(guide_sites.values()):
        for frame in site["cond_indep_stack"]:
            if frame.vectorized:
                nesting = max(nesting, -frame.dim)
    return PairLayout(latent=latent, observed=observed, max_plate_nesting=nesting)


def first_line(e: Exception) -> str:
    """The first line of an exception's message: Pyro appends whole trace tables below it."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def per_datapoint(
    values: torch.Tensor, site: dict, layout: PairLayout, data_plate: str, keep_trailing: int = 0
) -> torch.Tensor:
    """Sum a site's batch-shaped ``values`` over every plate but the particle and data plates.

    Returns shape ``[K, N, *trailing]``; ``keep_trailing`` dimensions at the right (for example
    the event dimensions of a per-coordinate KL) are kept as they are.
    """
    trailing = values.shape[values.dim() - keep_trailing:] if keep_trailing else torch.Size()
    batch = values.shape[: values.dim() - keep_trailing]
    width = layout.max_plate_nesting + 1
    if len(batch) > width:
        raise ConventionError(
            f"site '{site['name']}' has batch shape {tuple(batch)}, more dimensions than its "
            "plates declare: wrap extra dimensions in .to_event() or a pyro.plate"
        )
    padded = values.reshape((1,) * (width - len(batch)) + tuple(batch) + tuple(trailing))
    data_axis = width + data_frame(site, data_plate).dim
    summed = [a for a in range(1, width) if a != data_axis]
    if summed:
        padded = padded.sum(dim=summed, keepdim=True)
    out = padded.reshape(padded.shape[0], padded.shape[data_axis], *trailing)
    return out


def site_log_prob(site: dict) -> torch.Tensor:
    """Unscaled log-density of a site's value, with the site's mask applied."""
    log_prob = log_density(site["fn"], site["value"])
    mask = site["mask"]
    if mask is not None and mask is not True:
        log_prob = torch.where(mask, log_prob, log_prob.new_zeros(()))
    return log_prob


def datapoint_rows(values: torch.Tensor, site: dict, layout: PairLayout, data_plate: str,
                   event_ndim: int) -> torch.Tensor:
    """Rearrange a site's values (batch shape, then ``event_ndim`` dims) to ``[K, N, -1]``.

    Unlike ``per_datapoint`` nothing is summed: dimensions of other plates are kept, flattened
    with the event dimensions, so a per-coordinate quantity stays per coordinate.
    """
    width = layout.max_plate_nesting + 1
    batch = values.shape[: values.dim() - event_ndim]
    padded = values.reshape((1,) * (width - len(batch)) + tuple(values.shape))
    data_axis = width + data_frame(site, data_plate).dim
    moved = padded.movedim(data_axis, 1)
    return moved.reshape(moved.shape[0], moved.shape[1], -1)
