"""Mirrors Pyro's examples/vae/ss_vae_M2.py (Kingma et al. 2014, M2) on unlabelled data.

As there: ``model(xs, ys=None)`` and ``guide(xs, ys=None)`` (labels observed where given), a
size-less ``pyro.plate("data")``, a discrete latent digit class y ~ OneHotCategorical(uniform)
beside z ~ Normal(0, I), a decoder of [z, y], and a guide with q(y | x) and q(z | x, y),
enumerated in parallel with ``config_enumerate(..., "parallel", expand=True)`` and trained with
``TraceEnum_ELBO``.  Networks concatenate broadcast inputs, as the original's ``ConcatModule``
does.
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import config_enumerate
from torch import nn

CLASSES, Z = 3, 2


def concat(*tensors):
    shape = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return torch.cat([t.expand(shape + t.shape[-1:]) for t in tensors], -1)


class SSVAE(nn.Module):
    def __init__(self, pixels: int = 16):
        super().__init__()
        self.pixels = pixels
        self.decoder = nn.Linear(Z + CLASSES, pixels)
        self.encoder_y = nn.Linear(pixels, CLASSES)
        self.encoder_z = nn.Linear(pixels + CLASSES, 2 * Z)
        self.guide = config_enumerate(self._guide, "parallel", expand=True)

    def model(self, xs, ys=None):
        pyro.module("ss_vae", self)
        batch_size = xs.size(0)
        with pyro.plate("data"):
            prior_loc = xs.new_zeros(batch_size, Z)
            zs = pyro.sample("z", dist.Normal(prior_loc, 1.0).to_event(1))
            alpha_prior = xs.new_ones(batch_size, CLASSES) / CLASSES
            ys = pyro.sample("y", dist.OneHotCategorical(alpha_prior), obs=ys)
            loc = torch.sigmoid(self.decoder(concat(zs, ys)))
            pyro.sample("x", dist.Bernoulli(loc, validate_args=False).to_event(1), obs=xs)

    def _guide(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is None:
                alpha = torch.softmax(self.encoder_y(xs), -1)
                ys = pyro.sample("y", dist.OneHotCategorical(alpha))
            loc, raw = self.encoder_z(concat(xs, ys)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw)).to_event(1))


def data(num: int = 60, pixels: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(CLASSES, pixels, generator=g) < 0.5).float()
    labels = torch.randint(CLASSES, (num,), generator=g)
    flip = torch.rand(num, pixels, generator=g) < 0.1
    return torch.where(flip, 1 - protos[labels], protos[labels])
