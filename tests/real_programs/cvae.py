"""Mirrors Pyro's examples/cvae (conditional VAE for image quadrants) at 4x4 pixels.

As there: ``model(xs, ys=None)`` and ``guide(xs, ys=None)``, a size-less ``pyro.plate("data")``,
a prior network p(z | xs) and a generation network, the observed quadrants picked by
boolean-mask indexing, ``loc[(xs == -1)].view(batch_size, -1)``, which does not broadcast over a
leading particle dimension (elbogap vectorizes it with torch.func.vmap), and without ``ys`` the
model records its prediction with ``pyro.deterministic`` while the guide falls back on the prior
network.  ``xs`` holds the observed quadrants (-1 where hidden), ``ys`` the whole image.

    z ~ Normal(prior_net(xs)),   ys_hidden ~ Bernoulli(generation_net(z)[hidden])
"""

import pyro
import pyro.distributions as dist
import torch
from torch import nn

PIXELS, Z = 16, 2


def data(num: int = 24, seed: int = 0):
    """(xs, ys): the input with its bottom half hidden, and the whole image."""
    g = torch.Generator().manual_seed(seed)
    ys = (torch.rand(num, PIXELS, generator=g) < 0.4).float()
    xs = ys.clone()
    xs[:, 8:] = -1.0
    return xs, ys


class CVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.prior_net = nn.Linear(PIXELS, 2 * Z)
        self.generation_net = nn.Linear(Z, PIXELS)
        self.recognition_net = nn.Linear(2 * PIXELS, 2 * Z)

    def prior(self, xs):
        loc, raw = self.prior_net(xs.clamp_min(0)).chunk(2, -1)
        return loc, nn.functional.softplus(raw)

    def model(self, xs, ys=None):
        pyro.module("generation_net", self)
        batch_size = xs.shape[0]
        with pyro.plate("data"):
            prior_loc, prior_scale = self.prior(xs)
            zs = pyro.sample("z", dist.Normal(prior_loc, prior_scale).to_event(1))
            loc = torch.sigmoid(self.generation_net(zs))
            if ys is not None:
                mask_loc = loc[(xs == -1)].view(batch_size, -1)
                mask_ys = ys[xs == -1].view(batch_size, -1)
                pyro.sample("y", dist.Bernoulli(mask_loc, validate_args=False).to_event(1),
                            obs=mask_ys)
            else:
                pyro.deterministic("y", loc.detach())
            return loc

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is None:
                loc, scale = self.prior(xs)
            else:
                loc, raw = self.recognition_net(torch.cat([xs, ys], -1).clamp_min(0)).chunk(2, -1)
                scale = nn.functional.softplus(raw)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))
