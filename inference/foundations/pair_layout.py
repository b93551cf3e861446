"""What a trace of a model/guide pair says about it, and the conventions checked on it.

The conventions (see README): model and guide take the same arguments, the first a tensor ``x``
whose first dimension indexes data points; every per-datapoint sample site sits inside
``pyro.plate(data_plate, ...)``; the guide samples each latent site under the model's name, with
a density.  Sites outside the data plate are global latent variables: the unit of the
diagnostics is then the whole data set.  Pyro's autoguides are read as Pyro reads them: log q is
the log-density of their auxiliary sites (``infer={"is_auxiliary": True}``) plus the
``log_density`` (a Jacobian) their ``Delta`` sites carry at the model's names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from .errors import ConventionError
from .traces import (
    data_frame,
    first_line,
    is_auxiliary,
    is_point_mass,
    sample_sites,
    site_log_prob,
    trace_pair,
    user_frame,
)

POINT_MASS_ADVICE = (
    "a point mass has no density, so log q, the evidence estimate and the evidence gap are not "
    "defined for it (an AutoDelta/MAP fit is a point estimate, not a posterior approximation); "
    "use a guide with a density: AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, or a "
    "hand-written mean-field guide"
)


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
    # Rows the data plate picks of x itself (pyro.plate("data", len(x), subsample_size=B)).
    subsample: int | None = None
    # Whether the observed sites hold less than x: the rest of x is an input the model
    # conditions on (a CVAE, a regression), and the evidence is log p(y | inputs).
    conditional: bool = False

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


class _AuxiliaryLeaves(Messenger):
    """Makes every auxiliary site's value a leaf that requires grad, so that which Delta sites
    are functions of it can be asked of autograd."""

    def __init__(self):
        super().__init__()
        self.values: dict[str, torch.Tensor] = {}

    def _postprocess_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and is_auxiliary(msg):
            if torch.is_tensor(msg["value"]) and msg["value"].is_floating_point():
                msg["value"] = msg["value"].detach().requires_grad_()
                self.values[msg["name"]] = msg["value"]


def _check_densities(guide: Callable, x: torch.Tensor, latent: tuple[str, ...]) -> tuple[str, ...]:
    """Refuse point masses; return the auxiliary sites that carry q's density."""
    leaves = _AuxiliaryLeaves()
    with torch.enable_grad(), pyro.validation_enabled(False):
        guide_trace = poutine.trace(leaves(guide)).get_trace(x)
    sites = sample_sites(guide_trace)
    auxiliary = tuple(n for n, s in sites.items() if is_auxiliary(s))
    for name in auxiliary:
        if is_point_mass(sites[name]["fn"]):
            raise ConventionError(
                f"guide site '{name}' is auxiliary (infer={{'is_auxiliary': True}}) but a Delta: "
                f"{POINT_MASS_ADVICE}"
            )
    aux_values = [leaves.values[n] for n in auxiliary if n in leaves.values]
    for name in latent:
        site = sites.get(name)
        if site is None or not is_point_mass(site["fn"]):
            continue
        value = site["value"]
        depends = False
        if aux_values and value.requires_grad:
            with torch.enable_grad():
                grads = torch.autograd.grad(value.sum(), aux_values, allow_unused=True,
                                            retain_graph=True)
            depends = any(g is not None for g in grads)
        if not depends:
            raise ConventionError(
                f"guide site '{name}' is a point mass (Delta) that no auxiliary site with a "
                f"density generates: {POINT_MASS_ADVICE}"
            )
    return auxiliary


def inspect_pair(
    model: Callable, guide: Callable, x: torch.Tensor, data_plate: str = "data"
) -> PairLayout:
    """Trace the pair once and check the conventions; raise ConventionError naming the site."""
    try:
        guide_trace = poutine.trace(guide).get_trace(x)
    except Exception as e:  # noqa: BLE001 - the user's code: any failure, said in one line
        raise ConventionError(f"the guide failed when called on x of shape {tuple(x.shape)}"
                              f"{user_frame(e)}: {type(e).__name__}: {first_line(e)}") from e
    try:
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    except Exception as e:  # noqa: BLE001
        raise ConventionError(
            f"the model failed when replayed on the guide's samples{user_frame(e)}: "
            f"{type(e).__name__}: {first_line(e)}{_who_is_at_fault(model, x, e)}"
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
    extra = [n for n, s in guide_sites.items() if n not in model_sites and not is_auxiliary(s)]
    if missing:
        instead = f" (it samples {extra} instead)" if extra else ""
        raise ConventionError(
            f"the guide does not sample the model's latent site(s) {missing}{instead}: a guide "
            "must sample every latent site under the same name as the model"
        )
    if extra:
        raise ConventionError(
            f"the guide samples site(s) {extra} that the model does not have; the evidence "
            "estimate needs q over exactly the model's latent sites (mark sites that only help "
            "to build q with infer={'is_auxiliary': True}, as Pyro's autoguides do)"
        )
    observed_in_guide = [n for n in observed if n in guide_sites]
    if observed_in_guide:
        raise ConventionError(f"the guide samples the model's observed site(s) {observed_in_guide}")
    auxiliary = _check_densities(guide, x, latent) if any(
        is_point_mass(guide_sites[n]["fn"]) for n in latent
    ) or any(is_auxiliary(s) for s in guide_sites.values()) else ()
    for name in observed:
        site = model_sites[name]
        expected, got = tuple(site["fn"].shape()), tuple(torch.as_tensor(site["value"]).shape)
        try:
            fits = torch.broadcast_shapes(got, expected) == expected
        except RuntimeError:
            fits = False
        if not fits:
            raise ConventionError(
                f"observed site '{name}': the data there has shape {got} but the model's "
                f"distribution has shape {expected} (a guide or plate built for another number "
                "of data points?)"
            )
    for name in latent:
        expected = tuple(model_sites[name]["fn"].shape())
        got = tuple(guide_sites[name]["value"].shape)
        if expected != got:
            raise ConventionError(
                f"latent site '{name}': the guide samples shape {got} but the model's "
                f"distribution there has shape {expected}"
            )
    n = x.shape[0]
    own_subsample = None
    global_sites = []
    # A model with no plate at all (Pyro's eight schools) observes x as one whole: every site
    # is then global and the unit is the data set.
    plate_names = {f.name for site in model_sites.values() for f in site["cond_indep_stack"]
                   if f.vectorized}
    for where, trace, sites in (("model", model_trace, model_sites),
                                ("guide", guide_trace, guide_sites)):
        declared, subsample = _subsample_rows(trace, data_plate)
        if subsample is not None and subsample != n and declared != n:
            raise ConventionError(
                f"{where}: plate '{data_plate}' declares {declared} points and subsamples "
                f"{subsample}, but x has {n} rows: either the plate declares x's rows and "
                f"subsamples them (pyro.plate('{data_plate}', len(x), subsample_size=B), the "
                "pair indexing x itself), or it declares the full data set's size and is handed "
                f"minibatches (pyro.plate('{data_plate}', N, len(x)))"
            )
        if subsample is not None and subsample < n:
            own_subsample = subsample
        for name, site in sites.items():
            frame = data_frame(site, data_plate)
            if frame is None:
                if site["is_observed"] and plate_names:
                    raise ConventionError(
                        f"observed site '{name}' is not inside pyro.plate('{data_plate}', ...): "
                        "the data plate must index the rows of x; the model's plates are "
                        f"{sorted(plate_names)}: pass data_plate=... (--data-plate on the "
                        "command line) naming the one over data points"
                    )
                if name not in global_sites:
                    global_sites.append(name)
                continue
            if frame.size not in (n, -1, own_subsample) and subsample != n:
                raise ConventionError(
                    f"{where} site '{name}': plate '{data_plate}' has size {frame.size} but x "
                    f"has {n} rows; use pyro.plate('{data_plate}', x.shape[0]) (a guide with "
                    "parameters for each data point, an autoguide on local latents, only runs "
                    "on the data it was built for: evaluate it there, and train it on the whole "
                    "data set per step)"
                )
    nesting = 0
    for site in list(model_sites.values()) + list(guide_sites.values()):
        for frame in site["cond_indep_stack"]:
            if frame.vectorized:
                nesting = max(nesting, -frame.dim)
    rows = own_subsample or n
    observed_size = sum(model_sites[name]["value"].numel() for name in observed)
    layout = PairLayout(latent=latent, observed=observed, max_plate_nesting=nesting,
                        global_sites=tuple(global_sites), auxiliary=auxiliary,
                        subsample=own_subsample,
                        conditional=observed_size < x[:1].numel() * rows)
    return _with_vectorization(model, guide, x, layout, data_plate)


def _subsample_rows(trace: Trace, data_plate: str) -> tuple[int | None, int | None]:
    """The data plate's declared size and how many indices it subsampled in ``trace`` (None,
    None: it did not subsample).  ``pyro.plate(name, N, B)`` declares the full size N and
    scales its sites by N / B: as Pyro's examples/svi_torch.py does with minibatches handed in
    from outside (B = len(x)), or to pick B of x's rows itself (N = len(x))."""
    site = trace.nodes.get(data_plate)
    if site is None or not site_is_subsample(site):
        return None, None
    size = getattr(site["fn"], "size", None)
    rows = len(site["value"])
    return (None, None) if rows == size else (size, rows)


def _with_vectorization(model: Callable, guide: Callable, x: torch.Tensor, layout: PairLayout,
                        data_plate: str) -> PairLayout:
    """Whether the pair broadcasts over a leading particle dimension: two particles are traced
    and every site must carry them; else evaluation goes particle by particle."""
    width = layout.max_plate_nesting + 1
    try:
        with pyro.validation_enabled(False), torch.no_grad():
            guide_trace, model_trace = trace_pair(model, guide, x, 2, layout.particle_dim)
            for trace in (guide_trace, model_trace):
                for site in sample_sites(trace).values():
                    lp = site_log_prob(site)
                    frame = data_frame(site, data_plate)
                    if (lp.dim() != width or lp.shape[0] != 2 or frame is not None
                            and lp.shape[width + frame.dim] != layout.rows(x)):
                        return replace(layout, vectorized=False)
    except Exception:  # noqa: BLE001 - any failure under the particle plate: not broadcastable
        return replace(layout, vectorized=False)
    return layout


def _who_is_at_fault(model: Callable, x: torch.Tensor, error: Exception) -> str:
    """A hint: whether the model fails on its own too (drawing from its prior), in which case
    the fault is the model's, not the guide's."""
    try:
        with pyro.validation_enabled(False), torch.no_grad():
            poutine.trace(model).get_trace(x)
    except Exception:  # noqa: BLE001
        shapes = ("; event dimensions of a site go in .to_event(n)"
                  if "Shape mismatch inside plate" in str(error) else "")
        return f" (the model fails on its own too, drawing from its prior: the fault is the model's{shapes})"
    return " (does the guide sample every latent site with the shape the model expects?)"


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
