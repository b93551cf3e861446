"""Mirrors Pyro's examples/cvae (conditional VAE for image quadrants) at 4x4 pixels.

As there: a size-less ``pyro.plate("data")``, a prior network p(z | x_in) and a generation
network, and the observed quadrants picked by boolean-mask indexing,
``loc[(xs == -1)].view(batch_size, -1)``, which does not broadcast over a leading particle
dimension: elbogap evaluates it one particle at a time.  The data tensor holds the input
(observed quadrants, -1 where hidden) in columns 0..15 and the target image in 16..31.

    z ~ Normal(prior_net(x_in)),   y_hidden ~ Bernoulli(generation_net(z)[hidden])
"""

import pyro
import pyro.distributions as dist
import torch
from torch import nn

PIXELS, Z = 16, 2


def data(num: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ys = (torch.rand(num, PIXELS, generator=g) < 0.4).float()
    xs = ys.clone()
    xs[:, 8:] = -1.0  # the bottom half is hidden and predicted
    return torch.cat([xs, ys], dim=1)


class CVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.prior_net = nn.Linear(PIXELS, 2 * Z)
        self.generation_net = nn.Linear(Z, PIXELS)
        self.recognition_net = nn.Linear(2 * PIXELS, 2 * Z)

    def model(self, data):
        xs, ys = data[:, :PIXELS], data[:, PIXELS:]
        pyro.module("generation_net", self)
        batch_size = xs.shape[0]
        with pyro.plate("data"):
            prior_loc, prior_raw = self.prior_net(xs.clamp_min(0)).chunk(2, -1)
            zs = pyro.sample("z", dist.Normal(prior_loc, nn.functional.softplus(prior_raw))
                             .to_event(1))
            loc = torch.sigmoid(self.generation_net(zs))
            mask_loc = loc[(xs == -1)].view(batch_size, -1)
            mask_ys = ys[xs == -1].view(batch_size, -1)
            pyro.sample("y", dist.Bernoulli(mask_loc, validate_args=False).to_event(1),
                        obs=mask_ys)

    def guide(self, data):
        with pyro.plate("data"):
            loc, raw = self.recognition_net(data.clamp_min(0)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw)).to_event(1))
