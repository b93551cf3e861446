"""What the conventions make of a model/guide pair's sites, and its sites' values read per data
point.

``PairLayout`` is what ``conventions.inspect_pair`` finds in a trace of the pair: which sites are
latent and observed, which plate indexes data points and how deep plates nest, whether the unit
is the data point or the data set.  The reductions below turn a site's values, of its batch shape
in the particle plate, into rows per particle and data point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pyro.poutine.trace_struct import Trace

from .errors import ConventionError
from .traces import data_frame


@dataclass(frozen=True)
class PairLayout:
    """What a trace of the pair tells about its sites, found once per batch of data."""

    latent: tuple[str, ...]
    observed: tuple[str, ...]
    max_plate_nesting: int
    # Latent sites of the model, and sites of the guide, outside the data plate: with any of
    # them the unit is the data set (one joint weight per draw), not the data point.
    global_sites: tuple[str, ...] = ()
    # Guide sites that carry q's density for latent sites sampled as Deltas (autoguides).
    auxiliary: tuple[str, ...] = ()
    # Whether the pair accepts a leading particle dimension (Pyro's vectorize_particles).
    vectorized: bool = True
    # For a pair that does not: how ``torch.func.vmap`` vectorizes its particles instead
    # (``particle_vmap``), found to give the plain passes' terms; None: one particle at a time,
    # for ``loop_reason``.
    vmap: str | None = None
    loop_reason: str | None = None
    # Rows the data plate picks of x itself (pyro.plate("data", len(x), subsample_size=B)).
    subsample: int | None = None
    # Whether the observed sites hold less than x: the rest of x is an input the model
    # conditions on (a CVAE, a regression), and the evidence is log p(y | inputs).
    conditional: bool = False
    # Latent sites whose KL to the prior may be taken in closed form: the guide draws every
    # site the model samples before them (a possible parent of their prior) before them too,
    # so that, given the earlier draws, the site is drawn from q exactly.
    closed_form: frozenset[str] = frozenset()
    # Guide sites that are observed (obs=...) or pyro.factor: a term of the guide's objective,
    # no part of the density q of the latent variables.
    guide_observed: tuple[str, ...] = ()
    # Sites with a scale of the user's (poutine.scale), beyond a subsampling plate's N / B.
    scaled: tuple[str, ...] = ()
    # Discrete sites of the model summed out exactly (foundations.enumeration): ``observed``
    # then holds the factors of their sum, and ``observed_names`` the user's observed sites.
    summed_out: tuple[str, ...] = ()
    observed_names: tuple[str, ...] = ()
    # Sites whose mask tensor was updated in place after they were drawn (scored with its final
    # value, as Pyro's ELBOs score them).
    masks_changed: tuple[str, ...] = ()
    # Latent sites the guide draws from a discrete distribution with a finite support, and how
    # many values each takes (``diagnostics.discrete_guide`` sums over them).
    discrete_guide: tuple[str, ...] = ()
    discrete_counts: tuple[int, ...] = ()

    @property
    def discrete_values(self) -> int:
        """Combinations of the discrete guide sites' values."""
        return math.prod(self.discrete_counts)

    def rows(self, x: torch.Tensor) -> int:
        """Data points a pass of the pair on ``x`` covers."""
        return self.subsample or x.shape[0]

    @property
    def particle_dim(self) -> int:
        # Left of every plate the pair declares, as Trace_ELBO's vectorize_particles does.
        return -(self.max_plate_nesting + 1)

    @property
    def per_datapoint(self) -> bool:
        return not self.global_sites


def global_part(trace: Trace, layout: PairLayout) -> Trace:
    """The guide sites of ``trace`` outside the data plate, to be replayed on other batches."""
    out = Trace()
    for name in layout.global_sites:
        if name in trace.nodes:
            out.add_node(name, **trace.nodes[name])
    return out


def per_datapoint(
    values: torch.Tensor, site: dict, layout: PairLayout, data_plate: str, keep_trailing: int = 0
) -> torch.Tensor:
    """Sum a site's batch-shaped ``values`` over every plate but the particle and data plates.

    Returns shape ``[K, N, *trailing]`` (``[K, 1, *trailing]`` for a site outside the data
    plate); ``keep_trailing`` dimensions at the right (for example the event dimensions of a
    per-coordinate KL) are kept as they are.
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
    frame = data_frame(site, data_plate)
    data_axis = width + frame.dim if frame is not None else None
    summed = [a for a in range(1, width) if a != data_axis]
    if summed:
        padded = padded.sum(dim=summed, keepdim=True)
    rows = padded.shape[data_axis] if data_axis is not None else 1
    return padded.reshape(padded.shape[0], rows, *trailing)


def datapoint_rows(values: torch.Tensor, site: dict, layout: PairLayout, data_plate: str,
                   event_ndim: int) -> torch.Tensor:
    """Rearrange a site's values (batch shape, then ``event_ndim`` dims) to ``[K, N, -1]``.

    Unlike ``per_datapoint`` nothing is summed: dimensions of other plates are kept, flattened
    with the event dimensions, so a per-coordinate quantity stays per coordinate.  A site
    outside the data plate gives ``[K, 1, -1]``.
    """
    width = layout.max_plate_nesting + 1
    batch = values.shape[: values.dim() - event_ndim]
    padded = values.reshape((1,) * (width - len(batch)) + tuple(values.shape))
    frame = data_frame(site, data_plate)
    if frame is None:
        return padded.reshape(padded.shape[0], 1, -1)
    moved = padded.movedim(width + frame.dim, 1)
    return moved.reshape(moved.shape[0], moved.shape[1], -1)



# Where frames are not the user's: torch, Pyro, Python's standard library and elbogap itself.
