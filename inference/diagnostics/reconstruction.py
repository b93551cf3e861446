"""Reconstructions and prior samples, read off the model's observed site.

No knowledge of a decoder is needed: the distribution at the observed site, with the model
replayed on the guide's z (reconstruction) or run with z drawn from the prior (samples), has a
``mean`` that is the expected image.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro import poutine

from ..foundations.data_plate import takes_program_arguments
from ..foundations.errors import ConventionError
from ..foundations.program_data import ProgramData
from ..foundations.traces import sample_sites, trace_pair


def _observed_site(trace, name: str | None) -> dict:
    # poutine.uncondition marks the sites it frees with infer["was_observed"].
    observed = {
        n: s for n, s in sample_sites(trace).items()
        if s["is_observed"] or s["infer"].get("was_observed", False)
    }
    if name is None:
        if len(observed) != 1:
            raise ConventionError(
                f"the model has observed sites {sorted(observed)}; name the one to show"
            )
        return next(iter(observed.values()))
    if name not in observed:
        raise ConventionError(f"the model has no observed site '{name}' (has {sorted(observed)})")
    return observed[name]


@takes_program_arguments
def reconstruct(
    model: Callable, guide: Callable, x: ProgramData, *, observed_site: str | None = None
) -> torch.Tensor:
    """E[x' | z] with z ~ q(z | x): the mean of the observed site with the model replayed."""
    with torch.no_grad():
        _, model_trace = trace_pair(model, guide, x)
        return _observed_site(model_trace, observed_site)["fn"].mean


@takes_program_arguments
def sample_prior_means(
    model: Callable, x: ProgramData, *, observed_site: str | None = None
) -> torch.Tensor:
    """E[x' | z] with z ~ p(z), one per row of ``x`` (whose values are not used)."""
    with torch.no_grad():
        trace = poutine.trace(poutine.uncondition(model)).get_trace(x)
        return _observed_site(trace, observed_site)["fn"].mean
