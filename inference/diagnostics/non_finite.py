"""Numbers that are not numbers.  Where a log-density is NaN or infinite (a likelihood that
overflows, a scale that underflows to 0, a model that divides by zero in evaluation only), the
ELBO, log p(x) and the gap of the points it touches are not numbers either: they are kept as
NaN (written as null, ``foundations.strict_json``), their k-hat and ESS are undefined rather
than read as heavy tails, and a note names the sites whose log-density was not finite."""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import torch

from ..foundations.pair_layout import PairLayout
from ..foundations.rng import rng_preserved
from ..foundations.traces import site_log_prob, trace_pair
from ..foundations.wording import counted
from .results import DATA_POINT, Diagnostics

# Draws of the guide tried when looking for the sites at fault.
PROBE_DRAWS = 8


def refuse_non_finite(model: Callable, guide: Callable, x, d: Diagnostics,
                      layout: PairLayout) -> None:
    """Where ``d``'s numbers are not finite: k-hat and ESS made undefined (NaN) there, and a
    note in ``d.notes`` naming the sites (found on the first such point, ``x`` its data)."""
    if d.unit == DATA_POINT:
        finite = torch.ones_like(d.elbo, dtype=torch.bool)
        for name in ("elbo", "reconstruction", "kl_prior", "log_evidence"):
            finite &= torch.isfinite(getattr(d, name))
        bad = ~finite
        count = int(bad.sum())
        if not count:
            return
        d.khat = torch.where(bad, torch.nan, d.khat)
        d.ess = torch.where(bad, torch.nan, d.ess)
        first = int(bad.nonzero()[0])
        probe = x[first:first + 1] if layout.subsample is None else x
        where = f"{count} of {counted(d.num_data, 'point')}"
        which = "their ELBO, log p(x) and evidence gap, and the means over points with them,"
    else:
        t = d.total
        if all(math.isfinite(v) for v in (t.elbo, t.reconstruction, t.kl_prior, t.log_evidence)):
            return
        d.khat, d.ess = torch.full_like(d.khat, torch.nan), torch.full_like(d.ess, torch.nan)
        t.khat = t.ess = None
        probe, where = x, "the data set"
        which = "its ELBO, log p(x) and evidence gap"
    sites = non_finite_sites(model, guide, probe)
    named = (", ".join(f"'{name}' ({what})" for name, what in sites.items()) if sites else
             f"no site in {PROBE_DRAWS} fresh draws (the draws of the evaluation hit it)")
    d.notes.append(f"not finite at {where}: the log-density of {named}; {which} are not "
                   "numbers (null in the files) and their k-hat undefined: look for an "
                   "overflow, a scale of 0 or a division by zero in the program")


def non_finite_sites(model: Callable, guide: Callable, x) -> dict[str, str]:
    """The sites of the pair (the guide's draws, the model replayed on them) whose log-density
    is NaN or infinite at ``x`` in any of ``PROBE_DRAWS`` draws, with where ("model, NaN")."""
    found: dict[str, str] = {}
    with rng_preserved(), torch.no_grad(), pyro.validation_enabled(False):
        for _ in range(PROBE_DRAWS):
            try:
                traces = trace_pair(model, guide, x)
            except Exception:  # the pair ran in evaluation: this probe only names sites
                return found
            for program, trace in zip(("guide", "model"), traces, strict=True):
                for name, site in trace.nodes.items():
                    if site["type"] != "sample" or name in found:
                        continue
                    log_p = site_log_prob(site)
                    if not torch.isfinite(log_p).all():
                        kind = ("NaN" if torch.isnan(log_p).any() else
                                "+inf" if (log_p == torch.inf).any() else "-inf")
                        found[name] = f"{program}, {kind}"
            if found:
                return found
    return found
