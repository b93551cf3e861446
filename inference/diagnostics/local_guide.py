"""The non-amortized mean-field guide: its own loc and scale for every data point.

    q(z_n) = Normal(z_n; loc_n, diag(scale_n^2))       for every latent site, per data point n

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

    def scale(self, name: str) -> torch.Tensor:
        return F.softplus(self.raw_scales[name])

    def guide(self, x: torch.Tensor) -> None:
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
                q = dist.Normal(self.locs[name], self.scale(name))
                pyro.sample(name, q.to_event(site.event_ndim))
