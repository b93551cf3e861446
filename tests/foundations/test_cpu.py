"""The scripts' CPU settings, checked in a fresh process since they are process-wide."""

import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import torch
from elbogap.foundations.cpu import configure_cpu, reuse_freed_memory
tiny = (torch.tensor([1e-30]) * torch.tensor([1e-10])).item()  # 1e-40: a denormal float32
configure_cpu()
flushed = (torch.tensor([1e-30]) * torch.tensor([1e-10])).item()
print(tiny > 0, flushed == 0, reuse_freed_memory())
"""


def test_denormals_are_flushed_and_glibc_keeps_freed_memory():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert out == ["True", "True", str(glibc)]
