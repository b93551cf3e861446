"""q(z) at any z for an autoguide: its latent sites are point masses (``Delta``) at
``T(u)``, u drawn by an auxiliary site with a density, T = ``biject_to(support)``.

Given z, u = T⁻¹(z) is the auxiliary site's value, and the guide conditioned on it scores
log q(z) = log q(u) + log |du/dz| (the Delta's ``log_density``).  Two layouts of Pyro's
autoguides are read off the guide's trace, never off its class: one auxiliary site per latent
(``AutoNormal``: ``name_unconstrained``), or one vector of every latent's u packed in the
guide's order (``AutoDiagonalNormal``, ``AutoMultivariateNormal``, ``AutoLowRankMultivariateNormal``,
``AutoIAFNormal``: ``_Auto..._latent``).  A layout is trusted only once it rebuilds the
auxiliary values of a draw of the guide from that draw's z.
"""

from __future__ import annotations

import torch
from torch.distributions import biject_to

from ..foundations.errors import ConventionError
from ..foundations.traces import is_auxiliary, is_point_mass, sample_sites

SUFFIX = "_unconstrained"


class AuxiliaryDensity:
    """Maps latent states u (``{site: T⁻¹(z)}``) to the values of the auxiliary sites that
    would have drawn them, for conditioning the guide there."""

    def __init__(self, guide_trace, latent: tuple[str, ...], supports: dict):
        sites = sample_sites(guide_trace)
        auxiliary = {n: s for n, s in sites.items() if is_auxiliary(s) and not s["is_observed"]}
        driven = [n for n in latent if n in sites and is_point_mass(sites[n]["fn"])]
        self.own = {n: n + SUFFIX for n in driven if n + SUFFIX in auxiliary}
        rest = [n for n in driven if n not in self.own]
        spare = [a for a in auxiliary if a not in self.own.values()]
        self.packed, self.order, self.batch = None, [], ()
        if rest:
            if len(spare) != 1 or auxiliary[spare[0]]["fn"].event_dim != 1:
                raise ConventionError(
                    f"guide sites {rest} are point masses whose auxiliary site cannot be told "
                    f"(auxiliary sites: {sorted(auxiliary) or 'none'}): AIS cannot evaluate the "
                    "guide's density at an arbitrary z; use start='prior' (--ais-start prior)")
            self.packed = spare[0]
            # The guide samples its point masses in the order it packed them.
            self.order = [n for n in sites if n in rest]
            self.batch = tuple(auxiliary[self.packed]["value"].shape[:-1])
        transforms = {n: biject_to(supports[n]) for n in driven}
        drawn = {n: transforms[n].inv(sites[n]["value"]) for n in driven}
        rebuilt = self.values(drawn)
        for name, value in rebuilt.items():
            actual = auxiliary[name]["value"]
            if value.shape != actual.shape or not torch.allclose(
                    value.double(), actual.double(), rtol=1e-4, atol=1e-4):
                raise ConventionError(
                    f"the guide's auxiliary site '{name}' is not T⁻¹ of its point masses' values "
                    "(T = biject_to of the model's support), so its density at an arbitrary z "
                    "cannot be read: use start='prior' (--ais-start prior)")

    def values(self, u: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The auxiliary sites' values at the latent state ``u``."""
        out = {aux: u[name] for name, aux in self.own.items()}
        if self.packed is not None:
            out[self.packed] = torch.cat(
                [u[n].reshape(self.batch + (-1,)) for n in self.order], -1)
        return out


def auxiliary_density(trace, latent: tuple[str, ...], supports: dict) -> AuxiliaryDensity | None:
    """The map for a guide (``trace``: a draw of it) whose latent sites are point masses (None
    where none is); raises ``ConventionError`` with the reason where it cannot be read."""
    sites = sample_sites(trace)
    if not any(n in sites and is_point_mass(sites[n]["fn"]) for n in latent):
        return None
    return AuxiliaryDensity(trace, latent, supports)
