"""Mirrors the structure of Pyro's examples/dmm/dmm.py (deep Markov model) on a linear-Gaussian
state space, so that log p(x) is exact (Kalman filter).

As in the original: one latent site ``z_t`` and one observed site ``obs_x_t`` per time step,
sequences of different lengths padded to the batch's longest and masked with
``poutine.mask``, the plate ``z_minibatch``, ``pyro.markov`` over time, and a guide whose
q(z_t | z_{t-1}, x) is a small network of the previous latent and the observations (here an
affine "combiner" of z_{t-1} and x_t).  The data tensor holds the length in column 0, then the
padded sequence.

    z_t ~ Normal(A z_{t-1}, 1),  z_0 = 0,   x_t ~ Normal(z_t, 0.5)          for t <= T_n
"""

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

A, NOISE = 0.8, 0.5
PLATE = "z_minibatch"


def data(num: int = 40, max_length: int = 12, seed: int = 0) -> torch.Tensor:
    """Sequences of lengths 3..max_length, shortest first."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.sort(torch.randint(3, max_length + 1, (num,), generator=g)).values
    x = torch.zeros(num, max_length + 1)
    x[:, 0] = lengths.float()
    z = torch.zeros(num)
    for t in range(1, max_length + 1):
        z = A * z + torch.randn(num, generator=g)
        obs = z + NOISE * torch.randn(num, generator=g)
        x[:, t] = torch.where(t <= lengths, obs, torch.zeros(()))
    return x


class DMM(nn.Module):
    def __init__(self):
        super().__init__()
        self.combiner = nn.Linear(2, 2)  # (z_{t-1}, x_t) -> (loc, raw scale)
        with torch.no_grad():
            self.combiner.weight.copy_(torch.tensor([[0.3, 0.6], [0.0, 0.0]]))
            self.combiner.bias.copy_(torch.tensor([0.0, -0.5]))

    def model(self, x):
        lengths, seq = x[:, 0], x[:, 1:]
        t_max = int(lengths.max())
        z_prev = x.new_zeros(x.shape[0])
        with pyro.plate(PLATE, x.shape[0]):
            for t in pyro.markov(range(1, t_max + 1)):
                with poutine.mask(mask=t <= lengths):
                    z_t = pyro.sample(f"z_{t}", dist.Normal(A * z_prev, 1.0))
                    pyro.sample(f"obs_x_{t}", dist.Normal(z_t, NOISE), obs=seq[:, t - 1])
                z_prev = z_t

    def guide(self, x):
        pyro.module("dmm", self)
        lengths, seq = x[:, 0], x[:, 1:]
        t_max = int(lengths.max())
        z_prev = x.new_zeros(x.shape[0])
        with pyro.plate(PLATE, x.shape[0]):
            for t in pyro.markov(range(1, t_max + 1)):
                inputs = torch.stack(torch.broadcast_tensors(z_prev, seq[:, t - 1]), -1)
                loc, raw = self.combiner(inputs).unbind(-1)
                with poutine.mask(mask=t <= lengths):
                    z_t = pyro.sample(f"z_{t}", dist.Normal(loc, nn.functional.softplus(raw)))
                z_prev = z_t


def exact_log_evidence(x) -> torch.Tensor:
    """Kalman filter, per sequence, in float64."""
    out = []
    for row in x.double():
        length, seq = int(row[0]), row[1:]
        mean, var, total = 0.0, 0.0, 0.0
        for t in range(length):
            mean, var = A * mean, A * A * var + 1.0
            s = var + NOISE**2
            total += float(torch.distributions.Normal(mean, s**0.5).log_prob(seq[t]))
            gain = var / s
            mean, var = mean + gain * (float(seq[t]) - mean), (1 - gain) * var
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)
