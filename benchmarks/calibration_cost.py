"""What simulation-based calibration costs, side by side in one run.

* **amortized SBC** on the benchmark's 784-400-50 Bernoulli VAE (random weights): elbogap's
  ``calibration`` (simulations per second, L = 99 guide draws each) beside the same computation
  written in PyTorch by hand (z* ~ N(0, I), x* ~ Bernoulli(decoder(z*)), the encoder's L draws,
  the ranks);
* **VSBC refits** on Pyro's Bayesian regression tutorial pair (``PyroModule[nn.Linear]``,
  ``AutoNormal``, 170 points): seconds per refit of elbogap's ``vsbc`` (its Adam steps, then the
  guide's draws) beside stock Pyro's ``SVI(Trace_ELBO).step`` run as many times.
"""

from __future__ import annotations

import statistics
import time

import pyro
import torch
from pyro.infer.autoguide import AutoNormal

from elbogap.diagnostics.calibration import calibration
from elbogap.diagnostics.vsbc import vsbc

from .programs_as_written import BayesianRegression


def _best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def amortized_rows(vae, enc, x: torch.Tensor, simulations: int, rounds: int) -> list[dict]:
    draws = 99

    def by_hand():
        with torch.no_grad():
            for _ in range(0, simulations, x.shape[0]):
                z = torch.randn(x.shape[0], vae.latent_dim)
                xs = torch.bernoulli(torch.sigmoid(vae.decoder(z)))
                loc, scale = enc.encode(xs)
                q = loc + scale * torch.randn(draws, *loc.shape)
                (q < z).sum(0)

    elbogap = _best(lambda: calibration(vae.model, enc.guide, x, num_simulations=simulations,
                                        num_draws=draws, seed=0), rounds)
    hand = _best(by_hand, rounds)
    return [{"what": "amortized SBC", "contender": name, "simulations": simulations,
             "per_second": simulations / t, "ratio_to_hand_written": t / hand}
            for name, t in (("elbogap calibration", elbogap), ("hand-written PyTorch", hand))]


def refit_rows(simulations: int, steps: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(170, 3, generator=g)
    y = x @ torch.tensor([1.0, -0.5, 0.3]) + 0.7 + 0.8 * torch.randn(170, generator=g)
    pyro.clear_param_store()
    model = BayesianRegression()
    guide = AutoNormal(model)
    guide(x, y)
    # torch's optimizers import torch._dynamo once, on the first Adam (seconds): not a refit's.
    vsbc(model, guide, x, y, num_simulations=2, num_steps=2, num_draws=10, seed=1)
    result = vsbc(model, guide, x, y, num_simulations=simulations, num_steps=steps,
                  num_draws=1000, lr=0.01, seed=0)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO())
    start = time.perf_counter()
    for _ in range(steps):
        svi.step(x, y)
    stock = time.perf_counter() - start
    return [{"what": "VSBC refit", "contender": name, "steps": steps, "seconds_per_refit": t,
             "ratio_to_stock_pyro": t / stock}
            for name, t in (("elbogap vsbc", result.seconds_per_refit),
                            (f"stock Pyro SVI, {steps} steps", stock))]


def markdown_rows(rows: list[dict]) -> list[str]:
    lines = ["", "| calibration | contender | simulations / s (amortized) or s per refit (VSBC) "
             "| × baseline |", "|---|---|---:|---:|"]
    for r in rows:
        if r["what"] == "amortized SBC":
            lines.append(f"| amortized SBC, {r['simulations']} simulations, L = 99 | "
                         f"{r['contender']} | {r['per_second']:.0f} / s | "
                         f"{r['ratio_to_hand_written']:.2f} |")
        else:
            lines.append(f"| VSBC refit, {r['steps']} Adam steps | {r['contender']} | "
                         f"{r['seconds_per_refit']:.2f} s | {r['ratio_to_stock_pyro']:.2f} |")
    return lines
