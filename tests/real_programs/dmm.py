"""Mirrors the structure of Pyro's examples/dmm/dmm.py (deep Markov model) on a linear-Gaussian
state space, so that log p(x) is exact (Kalman filter).

As in the original: ``model(mini_batch, mini_batch_reversed, mini_batch_mask,
mini_batch_seq_lengths, annealing_factor=1.0)`` and the guide with the same signature, one latent
site ``z_t`` and one observed site ``obs_x_t`` per time step, sequences of different lengths
padded and masked (``.mask(mini_batch_mask[:, t - 1:t])``), the plate ``z_minibatch``,
``pyro.markov`` over time, and a guide whose q(z_t | z_{t-1}, x) is a small network of the
previous latent and the observations (here an affine "combiner" of z_{t-1} and x_t).

Two departures, both said here: the original's ``mini_batch_reversed`` is a ``PackedSequence`` for
its RNN; this guide has no RNN, so the reversed sequences are a padded tensor it does not read.
And ``T_max`` is the longest sequence *in the minibatch* (the original cuts each minibatch to
it in ``poly.get_mini_batch``), so minibatches have different sites.

    z_t ~ Normal(A z_{t-1}, 1),  z_0 = 0,   x_t ~ Normal(z_t, 0.5)          for t <= T_n
"""

import pyro
import pyro.distributions as dist
import torch
from torch import nn

A, NOISE = 0.8, 0.5


def data(num: int = 40, max_length: int = 12, seed: int = 0):
    """(mini_batch [N, T, 1], mini_batch_reversed, mini_batch_mask [N, T], seq_lengths [N]):
    lengths 3..max_length, shortest first."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.sort(torch.randint(3, max_length + 1, (num,), generator=g)).values
    seq = torch.zeros(num, max_length)
    z = torch.zeros(num)
    for t in range(max_length):
        z = A * z + torch.randn(num, generator=g)
        obs = z + NOISE * torch.randn(num, generator=g)
        seq[:, t] = torch.where(t < lengths, obs, torch.zeros(()))
    mask = (torch.arange(max_length) < lengths[:, None]).float()
    reversed_ = torch.stack([torch.cat([s[:n].flip(0), s[n:]]) for s, n in zip(seq, lengths, strict=True)])
    return seq[..., None], reversed_[..., None], mask, lengths


def flipped(arguments):
    """The same sequences, longest first."""
    return tuple(a.flip(0) for a in arguments)


class DMM(nn.Module):
    def __init__(self):
        super().__init__()
        self.combiner = nn.Linear(2, 2)  # (z_{t-1}, x_t) -> (loc, raw scale)
        with torch.no_grad():
            self.combiner.weight.copy_(torch.tensor([[0.3, 0.6], [0.0, 0.0]]))
            self.combiner.bias.copy_(torch.tensor([0.0, -0.5]))

    def model(self, mini_batch, mini_batch_reversed, mini_batch_mask, mini_batch_seq_lengths,
              annealing_factor=1.0):
        T_max = int(mini_batch_seq_lengths.max())
        z_prev = mini_batch.new_zeros(mini_batch.size(0), 1)
        with pyro.plate("z_minibatch", len(mini_batch)):
            for t in pyro.markov(range(1, T_max + 1)):
                mask = mini_batch_mask[:, t - 1:t].bool()
                with pyro.poutine.scale(scale=annealing_factor):
                    z_t = pyro.sample(f"z_{t}", dist.Normal(A * z_prev, 1.0).mask(mask)
                                      .to_event(1))
                pyro.sample(f"obs_x_{t}", dist.Normal(z_t, NOISE).mask(mask).to_event(1),
                            obs=mini_batch[:, t - 1, :])
                z_prev = z_t

    def guide(self, mini_batch, mini_batch_reversed, mini_batch_mask, mini_batch_seq_lengths,
              annealing_factor=1.0):
        pyro.module("dmm", self)
        T_max = int(mini_batch_seq_lengths.max())
        z_prev = mini_batch.new_zeros(mini_batch.size(0), 1)
        with pyro.plate("z_minibatch", len(mini_batch)):
            for t in pyro.markov(range(1, T_max + 1)):
                inputs = torch.cat(torch.broadcast_tensors(z_prev, mini_batch[:, t - 1, :]), -1)
                loc, raw = self.combiner(inputs).chunk(2, -1)
                mask = mini_batch_mask[:, t - 1:t].bool()
                with pyro.poutine.scale(scale=annealing_factor):
                    z_t = pyro.sample(f"z_{t}", dist.Normal(loc, nn.functional.softplus(raw))
                                      .mask(mask).to_event(1))
                z_prev = z_t


def exact_log_evidence(mini_batch, mini_batch_seq_lengths) -> torch.Tensor:
    """Kalman filter, per sequence, in float64."""
    out = []
    for seq, length in zip(mini_batch.double()[..., 0], mini_batch_seq_lengths, strict=True):
        mean, var, total = 0.0, 0.0, 0.0
        for t in range(int(length)):
            mean, var = A * mean, A * A * var + 1.0
            s = var + NOISE**2
            total += float(torch.distributions.Normal(mean, s**0.5).log_prob(seq[t]))
            gain = var / s
            mean, var = mean + gain * (float(seq[t]) - mean), (1 - gain) * var
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)
