"""What a model/guide pair must be for its diagnostics, checked on traces of it.

Both are called with the program's own arguments (``foundations.data_plate`` binds them and
finds the data plate); the guide samples each latent site of the model that the model does not
sum out, under the model's name, with a density.  Sites outside the data plate are global latent
variables: the unit of the diagnostics is then the whole data set.  Pyro's autoguides are read
as Pyro reads them: log q is the log-density of their auxiliary sites
(``infer={"is_auxiliary": True}``) plus the ``log_density`` (a Jacobian) their ``Delta`` sites
carry at the model's names.  ``inspect_pair`` returns the ``PairLayout`` it finds, or a
``ConventionError`` naming the site and the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pyro
import torch
from pyro import poutine
from pyro.infer.inspect import get_dependencies
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from .enumeration import OBSERVED_NUMEL, OBSERVES, SUMS_OVER
from .errors import ConventionError
from .module_mode import evaluation_mode
from .pair_layout import PairLayout, per_datapoint
from .program_data import described
from .rng import rng_preserved
from .traces import (
    data_frame,
    first_line,
    is_auxiliary,
    is_point_mass,
    particle,
    sample_sites,
    site_log_prob,
    trace_pair,
    traced_model,
    user_frame,
)

POINT_MASS_ADVICE = (
    "a point mass has no density, so log q, the evidence estimate and the evidence gap are not "
    "defined for it (an AutoDelta/MAP fit is a point estimate, not a posterior approximation); "
    "use a guide with a density: AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, or a "
    "hand-written mean-field guide"
)


class _AuxiliaryLeaves(Messenger):
    """Makes every auxiliary site's value a leaf that requires grad, so that which Delta sites
    are functions of it can be asked of autograd."""

    def __init__(self):
        super().__init__()
        self.values: dict[str, torch.Tensor] = {}

    def _postprocess_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and is_auxiliary(msg) and not msg["is_observed"]:
            if torch.is_tensor(msg["value"]) and msg["value"].is_floating_point():
                msg["value"] = msg["value"].detach().requires_grad_()
                self.values[msg["name"]] = msg["value"]


class _MaskWatch(Messenger):
    """Keeps a copy of each sample site's mask as it was when the site was drawn: a mask tensor
    updated in place afterwards (``mask |= ...`` in a loop) is read with its final value when
    log-densities are computed, after the program has run, by Pyro's ELBOs and here alike."""

    def __init__(self):
        super().__init__()
        self.masks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _postprocess_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and torch.is_tensor(msg.get("mask")):
            self.masks[msg["name"]] = (msg["mask"], msg["mask"].clone())

    def changed(self) -> tuple[str, ...]:
        return tuple(name for name, (mask, then) in self.masks.items()
                     if mask.shape != then.shape or not torch.equal(mask, then))


def traced(model: Callable, guide: Callable | None, x) -> tuple[Trace | None, Trace]:
    """One trace of the guide on ``x`` and of the model replayed on it (of the model alone,
    drawing from its prior, without a guide); a failure of the user's code is a
    ConventionError saying where, and whose fault it is."""
    if guide is None:
        try:
            return None, traced_model(model, x)
        except Exception as e:  # noqa: BLE001 - the user's code: any failure, said in one line
            raise ConventionError(f"the model failed when called on {described(x)}"
                                  f"{user_frame(e)}: {type(e).__name__}: {first_line(e)}") from e
    watch = _MaskWatch()
    try:
        guide_trace = poutine.trace(watch(guide)).get_trace(x)
    except Exception as e:  # noqa: BLE001
        raise ConventionError(f"the guide failed when called on {described(x)}"
                              f"{user_frame(e)}: {type(e).__name__}: {first_line(e)}") from e
    try:
        model_trace = traced_model(watch(poutine.replay(model, trace=guide_trace)), x)
    except ConventionError:
        # A point mass is the first thing to say, before what the model's sum refuses.
        sampled = sample_sites(guide_trace)
        if any(is_point_mass(s["fn"]) for s in sampled.values()):
            _check_densities(guide, x, tuple(n for n, s in sampled.items()
                                             if not s["is_observed"]))
        raise
    except Exception as e:  # noqa: BLE001
        raise ConventionError(
            f"the model failed when replayed on the guide's samples{user_frame(e)}: "
            f"{type(e).__name__}: {first_line(e)}{_who_is_at_fault(model, x, e)}"
        ) from e
    model_trace.masks_changed = watch.changed()
    return guide_trace, model_trace


def _check_densities(guide: Callable, x: torch.Tensor, latent: tuple[str, ...]) -> tuple[str, ...]:
    """Refuse point masses; return the auxiliary sites that carry q's density."""
    leaves = _AuxiliaryLeaves()
    with torch.enable_grad(), pyro.validation_enabled(False):
        guide_trace = poutine.trace(leaves(guide)).get_trace(x)
    sites = sample_sites(guide_trace)
    auxiliary = tuple(n for n, s in sites.items() if is_auxiliary(s) and not s["is_observed"])
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
    model: Callable, guide: Callable, x: torch.Tensor, data_plate: str | None = "data",
    verified: set | None = None, replay_particles: bool = True,
) -> PairLayout:
    """Trace the pair once and check the conventions; raise ConventionError naming the site.

    ``verified`` holds the keys (x's shape and the pair's sites) of passes whose particles
    were already found to replay alike: a caller that inspects batch after batch of one data
    set checks each shape once.  Without ``replay_particles`` only the shapes of particles are
    checked (for a caller that draws one particle at a time, in no plate).
    """
    guide_trace, model_trace = traced(model, guide, x)
    model_sites = sample_sites(model_trace)
    guide_sites = sample_sites(guide_trace)
    latent = tuple(n for n, s in model_sites.items() if not s["is_observed"])
    observed = tuple(n for n, s in model_sites.items() if s["is_observed"])
    if not observed:
        raise ConventionError(
            "the model has no observed sample site: pass the data as obs=x to pyro.sample"
        )
    # A point mass is the first thing to say: an AutoDelta lacks sites for other reasons too.
    present = tuple(n for n in latent if n in guide_sites)
    auxiliary = _check_densities(guide, x, present) if any(
        is_point_mass(guide_sites[n]["fn"]) for n in present
    ) or any(is_auxiliary(s) and not s["is_observed"] for s in guide_sites.values()) else ()
    missing = [n for n in latent if n not in guide_sites]
    enumerated = [n for n in missing if model_sites[n]["infer"].get("enumerate")]
    if enumerated:
        how = {model_sites[n]["infer"]["enumerate"] for n in enumerated}
        raise ConventionError(
            f"model site(s) {enumerated} are marked for enumeration "
            f"(infer={{'enumerate': {sorted(how)}}}) but were not summed out: the diagnostics "
            "sum out sites marked 'parallel' (config_enumerate's default) when called as "
            "evaluate(model, guide, *args), so that log p(x) marginalizes them; mark them "
            "'parallel', or sample them in the guide"
        )
    # Observed sites and factors of the guide score the guide's objective; q is the rest.
    guide_observed = tuple(n for n, s in guide_sites.items()
                           if s["is_observed"] and n not in model_sites)
    extra = [n for n, s in guide_sites.items()
             if n not in model_sites and not is_auxiliary(s) and not s["is_observed"]]
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
        raise ConventionError(
            f"the guide samples the model's observed site(s) {observed_in_guide}: the model "
            "fixes them to the data, so q over them is no distribution of latents (rename the "
            "guide's site, or mark it infer={'is_auxiliary': True} if it only builds q)"
        )
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
            if frame is None and name in guide_observed:
                continue  # a term of the guide's objective: no latent of the data set
            if frame is None:
                if site["is_observed"] and plate_names and data_plate is not None:
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
    # A discrete guide site's KL is taken where its reconstruction is: over the same draws, or
    # summed over its values (diagnostics.discrete_guide), never in closed form beside draws.
    discrete = _discrete_guide_sites(guide_sites, latent)
    observed_size = sum(model_sites[name]["infer"].get(OBSERVED_NUMEL,
                                                       model_sites[name]["value"].numel())
                        for name in observed)
    layout = PairLayout(latent=latent, observed=observed, max_plate_nesting=nesting,
                        global_sites=tuple(global_sites), auxiliary=auxiliary,
                        subsample=own_subsample,
                        conditional=observed_size < x[:1].numel() * rows,
                        closed_form=_closed_form_sites(model, x, model_trace, guide_trace, latent)
                        - set(discrete["discrete_guide"]),
                        guide_observed=guide_observed,
                        scaled=_scaled_sites(model_sites, guide_sites),
                        summed_out=_held(model_sites, observed, SUMS_OVER, ()),
                        observed_names=_held(model_sites, observed, OBSERVES, None),
                        masks_changed=getattr(model_trace, "masks_changed", ()),
                        **discrete)
    return _with_vectorization(model, guide, x, layout, data_plate, verified, replay_particles)


def _closed_form_sites(model: Callable, x: torch.Tensor, model_trace: Trace, guide_trace: Trace,
                       latent: tuple[str, ...]) -> frozenset[str]:
    """The latent sites whose KL may be taken in closed form, per particle: those whose prior
    depends on no site the guide draws after them.  Given the guide's earlier draws such a site
    is drawn from its q exactly, and E_q[log q(z) - log p(z | parents)] is the mean of the
    closed form; a parent drawn after the site, from a q that may depend on it (a
    semi-supervised guide's q(y | x, z)), breaks that.  Pyro's TraceMeanField_ELBO asks the
    guide for the model's order outright; here a site drawn out of that order is asked of
    Pyro's provenance tracking (``get_dependencies``) whether its prior depends on the later
    one, and where that cannot be told it is taken to."""
    order = [n for n, s in model_trace.nodes.items() if s["type"] == "sample" and n in latent]
    position = {n: i for i, n in enumerate(guide_trace.nodes)}
    suspects = {name: [e for e in order[:i] if position[e] > position[name]]
                for i, name in enumerate(order)}
    if any(suspects.values()):
        try:
            with rng_preserved(), torch.no_grad(), pyro.validation_enabled(False):
                prior = get_dependencies(model, (x,))["prior_dependencies"]
        except Exception:  # noqa: BLE001 - provenance tracking that fails tells nothing
            prior = {}
        suspects = {name: [e for e in later if e in prior.get(name, later)]
                    for name, later in suspects.items()}
    return frozenset(name for name in order if not suspects[name])


def _discrete_guide_sites(guide_sites: dict, latent: tuple[str, ...]) -> dict:
    """The latent sites the guide draws from a discrete distribution of finite support, with
    the number of values of each (``PairLayout.discrete_guide``)."""
    names, counts = [], []
    for name in latent:
        fn = guide_sites[name]["fn"]
        if fn.support.is_discrete and fn.has_enumerate_support:
            names.append(name)
            counts.append(fn.enumerate_support(expand=False).shape[0])
    return {"discrete_guide": tuple(names), "discrete_counts": tuple(counts)}


def _held(sites: dict, observed: tuple[str, ...], key: str, default) -> tuple[str, ...]:
    """What the factors of an enumerated sum record under ``key`` (a plain observed site: its
    own name where ``default`` is None, else ``default``)."""
    found = []
    for name in observed:
        held = sites[name]["infer"].get(key, (name,) if default is None else default)
        found.extend(held)
    return tuple(dict.fromkeys(found))


def _scaled_sites(*sites: dict) -> tuple[str, ...]:
    """Sites whose log-density carries a scale of the user's (``poutine.scale``): their scale
    beyond what subsampling plates apply (N / B)."""
    found = []
    for group in sites:
        for name, site in group.items():
            plates = 1.0
            for frame in site["cond_indep_stack"]:
                if frame.full_size is not None and frame.full_size != frame.size:
                    plates *= frame.full_size / frame.size
            scale = torch.as_tensor(site["scale"], dtype=torch.float64)
            if not torch.allclose(scale, torch.tensor(plates, dtype=torch.float64), rtol=1e-6):
                found.append(name)
    return tuple(dict.fromkeys(found))


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
                        data_plate: str, verified: set | None = None,
                        replay_particles: bool = True) -> PairLayout:
    """Whether the pair broadcasts over a leading particle dimension.  Shapes are not enough: a
    decoder that normalizes along a fixed axis (``softmax(dim=1)``, ``BatchNorm1d`` on ``[batch,
    features]``) accepts ``[K, N, D]`` where N happens to equal D, and computes something else.
    So two particles are traced in the particle plate, every site must carry them, and each
    particle's per-point log-density of every site must equal that of the same z replayed
    without the plate (in evaluation mode, where the pair is a function of z); else evaluation
    goes particle by particle, with a note."""
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
            key = (tuple(x.shape), layout.latent, layout.observed)
            if not replay_particles or verified is not None and key in verified:
                return layout
            with rng_preserved(), evaluation_mode(model, guide) as changed:
                # The traces above are the pair's at z unless switching modes changed a layer.
                if changed:
                    guide_trace, model_trace = trace_pair(model, guide, x, 2, layout.particle_dim,
                                                          replay_guide=guide_trace)
                if not _replays_alike(model, guide, x, layout, data_plate,
                                      (guide_trace, model_trace)):
                    return replace(layout, vectorized=False)
            if verified is not None:
                verified.add(key)
    except Exception:  # noqa: BLE001 - any failure under the particle plate: not broadcastable
        return replace(layout, vectorized=False)
    return layout


# A site's log-density per point, vectorized and plain: equal up to float32 rounding of sums
# over the site's coordinates (784 pixels: ~1e-5 relative).
REPLAY_RTOL, REPLAY_ATOL = 1e-4, 1e-3


def _replays_alike(model: Callable, guide: Callable, x: torch.Tensor, layout: PairLayout,
                   data_plate: str, vectorized: tuple[Trace, Trace]) -> bool:
    """Whether each of the two particles of the ``vectorized`` traces (guide, model) gives every
    site of the pair the same per-point log-density as replayed on its own."""
    for j in (0, 1):
        plain = trace_pair(model, guide, x,
                           replay_guide=particle(vectorized[0], j, layout.particle_dim))
        for many, one in zip(vectorized, plain, strict=True):
            many, one = sample_sites(many), sample_sites(one)
            if many.keys() != one.keys():
                return False
            for name, site in many.items():
                a = per_datapoint(site_log_prob(site), site, layout, data_plate)[j]
                b = per_datapoint(site_log_prob(one[name]), one[name], layout, data_plate)[0]
                if a.shape != b.shape or not torch.allclose(
                        a.double(), b.double(), rtol=REPLAY_RTOL, atol=REPLAY_ATOL):
                    return False
    return True


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
