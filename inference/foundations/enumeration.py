"""Discrete latent variables the model sums out, as ``config_enumerate`` + ``TraceEnum_ELBO`` do.

A model site marked ``infer={"enumerate": "parallel"}`` that the guide does not sample is summed
out of the model exactly: the program runs under ``poutine.enum`` (its values laid out along
dimensions left of every plate and of the particle plate), and every site whose log-density
depends on one of those dimensions is contracted with Pyro's own tensor message passing
(``pyro.ops.contract.contract_tensor_tree``, the contraction ``TraceEnum_ELBO`` runs) into
factors that no longer do.  Each factor stands in the trace as an observed site (a
``pyro.factor``), in the plates it still lives in: log p(x, z) is then
log sum_d p(x, d, z) of the continuous latents z alone, per data point where the factor sits in
the data plate.  Importance sampling, the ELBO, k-hat and AIS run over z.

A continuous latent whose prior depends on an enumerated value (z ~ p(z | d)) has a mixture for
its prior, which the KL to the prior per site cannot be split from: such a pair is refused.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import pyro.distributions as dist
import torch
from opt_einsum import shared_intermediates
from pyro import poutine
from pyro.ops import packed
from pyro.ops.contract import contract_tensor_tree
from pyro.ops.rings import LogRing
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from .errors import ConventionError

# ``infer`` keys of a factor site made here: the model sites it sums over and holds, and how
# many values of the data the observed ones among them held.
SUMS_OVER = "elbogap_sums_over"
HOLDS = "elbogap_holds"
OBSERVES = "elbogap_observes"
OBSERVED_NUMEL = "elbogap_observed_numel"


def marked_for_enumeration(site: dict) -> bool:
    return site["infer"].get("enumerate") is not None


def enumerating(model: Callable, first_dim: int) -> Callable:
    """``model`` run under ``poutine.enum``, its enumerated dimensions from ``first_dim``
    leftwards (left of every plate and of the particle plate)."""
    handler = poutine.enum(model, first_available_dim=first_dim)

    def program(*args, **kwargs):
        return handler(*args, **kwargs)

    program.program = getattr(model, "program", model)
    program.enumerates = True
    # The program drawing its discrete states instead (to simulate data from it).
    program.unenumerated = model
    return program


def _is_enumerated(site: dict) -> bool:
    return (site["type"] == "sample" and not site["is_observed"]
            and site["infer"].get("_enumerate_dim") is not None)


def contracted(trace: Trace) -> Trace:
    """``trace`` (of a model run under ``enumerating``) with its enumerated sites, and every
    site whose log-density depends on them, replaced by the factors of their sum: a trace whose
    sites no longer carry enumerated dimensions.  A trace without enumerated sites is returned
    as it is."""
    enumerated = [n for n, s in trace.nodes.items() if _is_enumerated(s)]
    if not enumerated:
        return trace
    first = max(trace.nodes[n]["infer"]["_enumerate_dim"] for n in enumerated)
    group = []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if name in enumerated or _has_enumerated_dims(_batch_shape(site), first):
            log_prob = site["fn"].log_prob(site["value"])
            mask = site["mask"]
            # As TraceEnum_ELBO: the mask goes inside the sum for the sites that depend on an
            # enumerated value, not on the enumerated site itself (it sums to one whatever it
            # is, where nothing unmasked depends on it: a padded step of a sequence).
            if name not in enumerated and mask is not None and mask is not True:
                log_prob = torch.where(torch.as_tensor(mask), log_prob, log_prob.new_zeros(()))
            site["unscaled_log_prob"] = site["log_prob"] = log_prob
            group.append(name)
    continuous = [n for n in group if n not in enumerated and not trace.nodes[n]["is_observed"]]
    if continuous:
        raise ConventionError(
            f"latent site(s) {continuous} have a prior that depends on enumerated site(s) "
            f"{enumerated}: their prior is a mixture, and the KL to the prior per site is not "
            "defined for it here; sample the discrete site(s) in the guide instead"
        )
    trace.pack_tensors()
    plate_symbols = set(trace.plate_to_symbol.values())
    frames = {f.name: f for n in group for f in trace.nodes[n]["cond_indep_stack"]
              if f.vectorized}
    log_factors: OrderedDict = OrderedDict()
    sum_dims, dim_to_size = set(), {}
    for name in group:
        site = trace.nodes[name]
        term = site["packed"]["unscaled_log_prob"]
        ordinal = frozenset(trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"]
                            if f.vectorized)
        log_factors.setdefault(ordinal, []).append(term)
        sum_dims.update(d for d in term._pyro_dims if d not in plate_symbols)
        dim_to_size.update(zip(term._pyro_dims, term.shape, strict=True))
    with shared_intermediates() as cache:
        factors = contract_tensor_tree(log_factors, sum_dims,
                                       ring=LogRing(cache=cache, dim_to_size=dim_to_size))
    out = trace.copy()
    observed = [n for n in group if trace.nodes[n]["is_observed"]]
    numel = sum(torch.as_tensor(trace.nodes[n]["value"]).numel() for n in observed)
    for name in group:
        out.remove_node(name)
    symbol_to_plate = {s: p for p, s in trace.plate_to_symbol.items()}
    terms = [(ordinal, t) for ordinal, ts in factors.items() for t in ts]
    for i, (ordinal, term) in enumerate(terms):
        stack = tuple(sorted((frames[symbol_to_plate[s]] for s in ordinal),
                             key=lambda f: -f.dim))
        value = packed.unpack(term, trace.symbol_to_dim)
        # Spread over the whole of each plate it lives in, as the sites it replaces were.
        shape = [1] * max([-f.dim for f in stack], default=0)
        for f in stack:
            extent = value.shape[f.dim] if -f.dim <= value.dim() else 1
            shape[f.dim] = f.size if f.size is not None and f.size > 0 else extent
        value = value.expand(torch.Size(shape))
        unit = dist.Unit(value)
        name = f"sum over {enumerated}" + (f" #{i + 1}" if len(terms) > 1 else "")
        out.add_node(name, type="sample", name=name, fn=unit, value=unit.sample(),
                     is_observed=True, cond_indep_stack=stack, mask=None, scale=1.0,
                     args=(), kwargs={}, done=True, stop=False, continuation=None,
                     infer={"is_auxiliary": True, SUMS_OVER: tuple(enumerated),
                            HOLDS: tuple(group), OBSERVES: tuple(observed),
                            OBSERVED_NUMEL: numel if i == 0 else 0})
    return out


def _batch_shape(site: dict) -> torch.Size:
    """The shape of a site's log-density, without computing it."""
    fn, value = site["fn"], torch.as_tensor(site["value"])
    return torch.broadcast_shapes(fn.batch_shape, value.shape[:value.dim() - fn.event_dim])


def _has_enumerated_dims(shape: torch.Size, first: int) -> bool:
    """Whether a batch shape extends along a dimension at or left of ``first``."""
    return any(shape[d] > 1 for d in range(first, -len(shape) - 1, -1))
