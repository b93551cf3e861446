"""Tracing a model/guide pair and reading its sites.

The guide is traced on the data and the model replayed on the guide's latent values, as Pyro's
ELBOs do; the K particles of an estimate are a plate left of every plate the pair declares, as
``Trace_ELBO(vectorize_particles=True)`` places it.  What the pair's sites mean for the
diagnostics (which are latent, which plate indexes data points) is ``pair_layout``'s business.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.distributions import Delta, MaskedDistribution
from pyro.distributions.torch_distribution import ExpandedDistribution
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch.distributions import Independent

from .enumeration import contracted
from .errors import ConventionError
from .log_density import log_density

PARTICLE_PLATE = "_elbogap_particles"


def sample_sites(trace: Trace) -> dict[str, dict]:
    """Sample sites that carry probability: no deterministic or subsample bookkeeping sites."""
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


def data_dim(site: dict, value: torch.Tensor, data_plate: str | None) -> int | None:
    """The dimension of ``value`` (the site's value, or a tensor laid out as it is with
    dimensions added on the left) that the data plate indexes; None for a site outside it."""
    frame = data_frame(site, data_plate)
    return None if frame is None else value.dim() - site["fn"].event_dim + frame.dim


def base_distribution(fn):
    """The distribution under Independent, mask and expand wrappers."""
    while isinstance(fn, Independent | MaskedDistribution | ExpandedDistribution):
        fn = fn.base_dist
    return fn


def is_point_mass(fn) -> bool:
    return isinstance(base_distribution(fn), Delta)


def is_auxiliary(site: dict) -> bool:
    return bool(site["infer"].get("is_auxiliary", False))


def in_particles(fn: Callable, num_particles: int | None, particle_dim: int | None) -> Callable:
    """``fn`` run inside the particle plate, as Pyro's ``vectorize_particles`` wraps it: the
    plate sits inside ``poutine.replay``, so the model's distributions get the particle
    dimension too (torch's KL functions that index with masks need it)."""
    if num_particles is None:
        return fn
    return pyro.plate(PARTICLE_PLATE, num_particles, dim=particle_dim)(fn)


def traced_model(model: Callable, x) -> Trace:
    """A trace of ``model`` on ``x``, with any discrete sites it enumerates summed out
    (``enumeration.contracted``)."""
    return contracted(poutine.trace(model).get_trace(x))


def trace_pair(
    model: Callable, guide: Callable, x: torch.Tensor, num_particles: int | None = None,
    particle_dim: int | None = None, replay_guide: Trace | None = None,
) -> tuple[Trace, Trace]:
    """Trace the guide on ``x`` and replay the model on the guide's latent values.

    With ``num_particles`` both run inside a plate of that size at ``particle_dim``, so every
    sample site gets a leading particle dimension.  ``replay_guide`` fixes the guide sites it
    holds (the global ones, shared by every batch of a data set).
    """
    guide = in_particles(guide, num_particles, particle_dim)
    model = in_particles(model, num_particles, particle_dim)
    if replay_guide is not None:
        if not isinstance(replay_guide, Trace):
            # A list of traces, say: poutine.replay would find no site in it and replay nothing.
            raise TypeError(f"replay_guide must be a pyro Trace, got {type(replay_guide).__name__}")
        guide = poutine.replay(guide, trace=replay_guide)
    guide_trace = poutine.trace(guide).get_trace(x)
    if replay_guide is not None:
        check_replayed(replay_guide, guide_trace, "the guide")
    model_trace = traced_model(poutine.replay(model, trace=guide_trace), x)
    return guide_trace, model_trace


def check_replayed(given: Trace, trace: Trace, program: str) -> None:
    """Raise ConventionError unless ``trace`` took every latent draw of ``given`` as it is: a
    replay that consumed nothing would let the program draw its own values, silently."""
    for name, site in given.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        taken = trace.nodes.get(name)
        if taken is None or taken["value"] is not site["value"]:
            raise ConventionError(
                f"{program} did not take the stored draw of site '{name}' when replayed "
                f"({'it has no such site' if taken is None else 'it drew its own'}): its sites "
                "must be the same on every run for draws to be shared across batches")


def check_conditioned(values: dict, trace: Trace, program: str) -> None:
    """Raise ConventionError unless every site of ``values`` was fixed in ``trace``."""
    for name, value in values.items():
        taken = trace.nodes.get(name)
        if taken is None or taken["value"] is not value:
            raise ConventionError(
                f"{program} did not take the value given for site '{name}' "
                f"({'it has no such site' if taken is None else 'it drew its own'}): "
                "a chain's state must fix every latent site")


def trace_pair_from_prior(
    model: Callable, guide: Callable, x: torch.Tensor, num_particles: int | None = None,
    particle_dim: int | None = None,
) -> tuple[Trace, Trace]:
    """The model traced on ``x`` with its latent sites drawn from their prior (its observed
    sites scored), and the guide replayed on those draws: q scored at z ~ p(z)."""
    guide = in_particles(guide, num_particles, particle_dim)
    model = in_particles(model, num_particles, particle_dim)
    model_trace = traced_model(model, x)
    guide_trace = poutine.trace(poutine.replay(guide, trace=model_trace)).get_trace(x)
    return guide_trace, model_trace


def particle(trace: Trace, j: int, particle_dim: int) -> Trace:
    """Particle ``j`` of a trace run in the particle plate, as a trace to replay the pair on
    without the plate: each sample site's value at index ``j`` of its particle dimension, with
    the leading size-1 dimensions the plate's broadcasting added taken off again."""
    out = Trace()
    for name, site in trace.nodes.items():
        if site["type"] != "sample":
            continue
        value = site["value"]
        in_plate = any(f.name == PARTICLE_PLATE for f in site["cond_indep_stack"])
        # Observed sites (data, factors) are never replayed: their values stay as they are.
        if (in_plate and not site["is_observed"] and not site_is_subsample(site)
                and torch.is_tensor(value)):
            event_dim = site["fn"].event_dim
            value = value.select(value.dim() - event_dim + particle_dim, j)
            rank = max([-f.dim for f in site["cond_indep_stack"]
                        if f.vectorized and f.name != PARTICLE_PLATE], default=0)
            while value.dim() - event_dim > rank and value.shape[0] == 1:
                value = value[0]
        out.add_node(name, **{**site, "value": value})
    return out


class FixedSubsample(Messenger):
    """Hands the data plate's subsample site the given indices: evaluation covers every point
    of a pair that picks its own minibatch, chunk by chunk."""

    def __init__(self, data_plate: str, indices: torch.Tensor):
        super().__init__()
        self.data_plate = data_plate
        self.indices = indices

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and msg["name"] == self.data_plate and site_is_subsample(msg):
            msg["value"] = self.indices
            msg["done"] = True


def user_frame(e: BaseException) -> str:
    """`` at file:line`` of the innermost frame of the user's own code in ``e``'s traceback
    (not Python's, torch's, Pyro's or elbogap's), or ''."""
    tb, found = e.__traceback__, None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not filename.startswith(_NOT_USER_CODE) and not filename.startswith("<"):
            found = f" at {filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return found or ""


def first_line(e: Exception) -> str:
    """The first line of an exception's message: Pyro appends whole trace tables below it."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    # "Error while computing log_prob at site 'obs':" says where; the reason is the next line.
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0]


def apply_mask(values: torch.Tensor, site: dict, event_ndim: int = 0) -> torch.Tensor:
    """``values`` (the site's batch shape, then ``event_ndim`` dims) where the site's mask
    (``poutine.mask``: padded steps of a sequence, say) is on, 0 elsewhere."""
    mask = site["mask"]
    if mask is None or mask is True:
        return values
    mask = torch.as_tensor(mask)
    return torch.where(mask.reshape(mask.shape + (1,) * event_ndim), values, values.new_zeros(()))


def site_log_prob(site: dict) -> torch.Tensor:
    """Unscaled log-density of a site's value, with the site's mask applied."""
    return apply_mask(log_density(site["fn"], site["value"]), site)


def guide_is_a_function_of_x(guide: Callable, x: torch.Tensor, latent: tuple[str, ...]) -> str | None:
    """None when every guide site's distribution depends on x only, not on other draws (two
    traces give each site the same density at the same value); else the first site that does
    not (a hierarchical guide q(z2 | z1, x))."""
    with torch.no_grad():
        first = poutine.trace(guide).get_trace(x)
        second = poutine.trace(guide).get_trace(x)
    for name in latent:
        a, b = first.nodes[name], second.nodes[name]
        value = a["value"]
        if not torch.allclose(a["fn"].log_prob(value), b["fn"].log_prob(value), atol=1e-5):
            return name
    return None


# Where frames are not the user's: torch, Pyro, Python's standard library and elbogap itself.
_NOT_USER_CODE = tuple(
    str(Path(m.__file__).resolve().parent) for m in (torch, pyro, contextlib)
) + (str(Path(__file__).resolve().parents[1]),)
