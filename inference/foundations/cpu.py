"""Process-wide CPU settings that make evaluation and training faster.

They change the whole process (the floating-point mode of torch's threads, glibc's allocator), so
no library call makes them on its own: the command-line scripts call ``configure_cpu`` first
thing, and a notebook calls ``elbogap.configure_cpu()`` in its first cell, before any tensor
work.  Without them ``evaluate`` on the MNIST VAE takes 2.25x the time of its decoder's two
matrix multiplications, with them 1.63-1.68x (``benchmarks/benchmark.py``).

Both were found profiling ``evaluate`` on the MNIST VAE (K = 5000, 100 test points).

**Denormal floats.**  A trained decoder drives the logits of always-empty pixels far negative,
and ``exp`` of them lands below float32's smallest normal number (1.2e-38), where x86 CPUs
compute at a fraction of their speed: 7.9 s on real test images against 4.8 s on synthetic ones
of the same shape, 4.9 s once denormals are flushed to zero.  Flushing changes no result by more
than 1e-38.

**Freed memory.**  ``evaluate`` allocates and frees the same few buffers of 5-20 MB for every
chunk of importance samples.  glibc gives blocks that large back to the kernel (``mmap``-ed,
or trimmed off the top of the heap), so every chunk faults its pages in afresh: 73 000 minor
page faults per 100 MNIST points at K = 1000, against 2 with the thresholds raised, and about a
fifth of the time.
The cost is that up to ``TRIM_THRESHOLD`` of freed memory stays resident.
"""

from __future__ import annotations

import ctypes
import sys

import torch

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 256 * 2**20


def configure_cpu() -> None:
    """Both settings.  Call it before any parallel work: torch's worker threads take the
    floating-point mode of the thread that creates them."""
    torch.set_flush_denormal(True)
    reuse_freed_memory()


def reuse_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; False where this is not glibc on Linux."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
