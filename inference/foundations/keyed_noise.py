"""Random numbers keyed by data point: a point's draws are a function of (seed, the point's index,
the step, the element), never of which process or batch computes it.

Torch's generators give one stream per call, so draws for a batch depend on the batch: split the
points over two processes, or into other batches, and every point gets other numbers.  Here each
number is a hash of its key (a counter-based generator, as Salmon et al. 2011's Philox, with a
smaller hash): the points of a batch get their own numbers whatever else is in it.

The hash is Wellons' ``lowbias32`` on 32-bit words, computed in int64 without overflow (each
product split in 16-bit halves), so it is exact on every device.  A uniform carries 32 random
bits, (h + 1/2) / 2^32; a normal, Box-Muller of two of them, is cut at 6.7 standard deviations,
which an HMC momentum never misses.
"""

from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
_SALT_SECOND = 0x68E31DA4  # the second uniform of a Box-Muller pair


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x * m) mod 2^32 for 0 <= x < 2^32, exact in int64."""
    high = ((x * (m >> 16)) & 0xFFFF) << 16
    return (high + x * (m & 0xFFFF)) & MASK32


def hash32(x: torch.Tensor | int) -> torch.Tensor:
    """lowbias32: a bijection of 32-bit words whose output bits each flip with probability
    close to 1/2 when one input bit does."""
    x = torch.as_tensor(x, dtype=torch.int64) & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _combine(a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    return hash32(a ^ hash32(b))


def stream_key(seed: int, stream: str) -> int:
    """A key for one use of a seed (AIS's chains, BDMC's reverse chains, ...): the same seed
    gives unrelated numbers to different uses."""
    key = hash32(seed & MASK32) ^ hash32(seed >> 32)
    for byte in stream.encode():
        key = _combine(key, byte)
    return int(key)


def point_seeds(key: int, first: int, count: int) -> list[int]:
    """Seeds of points ``first .. first + count - 1`` for torch's generator, from ``key``."""
    points = torch.arange(first, first + count, dtype=torch.int64)
    return _combine(torch.full_like(points, key), points).tolist()


class KeyedNoise:
    """Noise in the shape of one tensor whose dimension ``point_dim`` indexes data points
    ``first, first + 1, ...`` (None: the whole tensor is one unit, index ``first``).  Element j
    of point n draws from the key (stream, n, j, counter)."""

    def __init__(self, key: int, shape: tuple[int, ...], point_dim: int | None, first: int,
                 device: torch.device):
        shape = tuple(shape)
        if point_dim is None:
            points = torch.full(shape, first, dtype=torch.int64, device=device)
            within = torch.arange(math.prod(shape), device=device).reshape(shape)
        else:
            point_dim %= len(shape)
            n = shape[point_dim]
            rest = shape[:point_dim] + shape[point_dim + 1:]
            moved = (n,) + rest
            points = (torch.arange(n, device=device) + first).reshape(
                (n,) + (1,) * len(rest)).expand(moved)
            within = torch.arange(math.prod(rest), device=device).reshape(rest).expand(moved)
            points, within = (t.movedim(0, point_dim) for t in (points, within))
        self.base = _combine(_combine(torch.full_like(points, key), points), within)

    def _bits(self, counter: int) -> torch.Tensor:
        return _combine(self.base, counter)

    def uniform(self, counter: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """U(0, 1) in the tensor's shape, a fresh draw for every ``counter``."""
        return ((self._bits(counter).double() + 0.5) / 2.0**32).to(dtype)

    def normal(self, counter: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """N(0, 1) in the tensor's shape, a fresh draw for every ``counter``."""
        bits = self._bits(counter)
        u1 = (bits.double() + 0.5) / 2.0**32
        u2 = (hash32(bits ^ _SALT_SECOND).double() + 0.5) / 2.0**32
        return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).to(dtype)
