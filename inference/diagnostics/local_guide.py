"""The non-amortized guide: its own loc and scale for every data point.

    q(z_n) = Normal(z_n; loc_n, diag(scale_n^2))       for every latent site, per data point n,

or, where the amortized guide's site is a full-covariance Gaussian, q*'s is too,
MultivariateNormal(z_n; loc_n, L_n L_nᵀ) with its own Cholesky factor L_n per point: q* is the
best member of the guide's own family for each point, as the split of the gap requires.

It is fitted to one fixed set of points (the x it was built for) and measures, by comparison
with an encoder, how much an amortized guide loses by sharing one network across all points
(the amortization gap, Cremer, Li & Duvenaud 2018).  Its parameters are plain nn.Parameters, not
entries of Pyro's param store, so fitting it never touches a trained model's checkpoint.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LocalSite:
    """Initial loc and scale of one site (its full shape), and the plates it sits in."""

    loc: torch.Tensor
    scale: torch.Tensor
    event_ndim: int
    plates: tuple[tuple[str, int, int], ...]  # (name, size, dim) from outermost to innermost
    scale_tril: torch.Tensor | None = None  # a full-covariance site's Cholesky factor


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


class LocalMeanFieldGuide(nn.Module):
    def __init__(self, sites: dict[str, LocalSite]):
        super().__init__()
        self.sites = sites
        self.locs = nn.ParameterDict(
            {name: nn.Parameter(s.loc.detach().clone()) for name, s in sites.items()}
        )
        self.raw_scales = nn.ParameterDict(
            {name: nn.Parameter(_inverse_softplus(s.scale.detach().clamp_min(1e-6)))
             for name, s in sites.items()}
        )
        # Below the diagonal of a full-covariance site's factor (its diagonal is the scale).
        self.off_diagonals = nn.ParameterDict(
            {name: nn.Parameter(s.scale_tril.detach().tril(-1).clone())
             for name, s in sites.items() if s.scale_tril is not None}
        )

    def scale(self, name: str) -> torch.Tensor:
        return F.softplus(self.raw_scales[name])

    def distribution(self, name: str) -> dist.TorchDistribution:
        site = self.sites[name]
        if name in self.off_diagonals:
            tril = self.off_diagonals[name].tril(-1) + torch.diag_embed(self.scale(name))
            q = dist.MultivariateNormal(self.locs[name], scale_tril=tril)
            return q.to_event(site.event_ndim - 1) if site.event_ndim > 1 else q
        return dist.Normal(self.locs[name], self.scale(name)).to_event(site.event_ndim)

    def guide(self, *args, **kwargs) -> None:
        # Its parameters are per point of the data it was fitted to: the arguments (the
        # program's, which it is called with) are not needed again.
        # One plate object per name, entered by every site inside it: a plate built twice
        # would record its subsample site twice ("Multiple sample sites named 'data'").
        plates = {}
        for site in self.sites.values():
            for plate_name, size, dim in site.plates:
                if plate_name not in plates:
                    plates[plate_name] = pyro.plate(plate_name, size, dim=dim)
        for name, site in self.sites.items():
            with ExitStack() as stack:
                for plate_name, _, _ in site.plates:
                    stack.enter_context(plates[plate_name])
                pyro.sample(name, self.distribution(name))
