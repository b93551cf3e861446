"""Side-by-side benchmark: elbogap, stock Pyro written the plain way, hand-written PyTorch.

One invocation, contenders alternated round by round so that drift of a shared machine hits all
alike; medians and ratios to the hand-written PyTorch of the same computation.

* training step of the 784-400-50 Bernoulli VAE (softplus MLPs, Adam, one-sample ELBO) at
  batch 256 and 32: elbogap's ``fit`` step (``ElboStep``), the Pyro VAE tutorial's model and
  guide under ``SVI(Trace_ELBO)``, and the same estimator written in PyTorch, with torch's
  default Adam (the plain way: ratios are to this one) and with the fused Adam elbogap uses (so
  that what is left between elbogap and it is Pyro's own overhead); with the machine's measured
  matmul rate and each contender's achieved GFLOP/s;
* evidence log p(x) by importance sampling: elbogap's ``evaluate`` vs ``pyro.infer.Importance``
  one data point at a time vs batched hand-written PyTorch; data points/s and peak memory;
* scaling of ``evaluate``: time and peak memory as K and as N grow.

Peak memory is measured in a fresh subprocess per configuration (peak RSS above the RSS after
set-up).  Writes benchmark.json and benchmark.md into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from elbogap.cli.command_line import HelpFormatter, add_device_flag, run_main
from elbogap.data.readers import load_mnist
from elbogap.diagnostics.ais import annealing_path
from elbogap.diagnostics.evaluation import evaluate
from elbogap.foundations.atomic import write_json_atomic, write_text_atomic
from elbogap.foundations.device import resolve_device, rows_per_chunk
from elbogap.foundations.distributed import Distributed
from elbogap.foundations.errors import ConfigError
from elbogap.foundations.psis import pareto_khat
from elbogap.guides.mean_field import MeanFieldGuide
from elbogap.models.vae import VAE
from elbogap.training.elbo_step import ElboStep

from . import calibration_cost, programs_as_written

DATA_DIM, HIDDEN, LATENT = 784, 400, 50
TRAIN_SIZE = 60_000
LOG_2PI = math.log(2 * math.pi)


# ---- the contenders ---------------------------------------------------------------------------


class TutorialEncoder(nn.Module):
    """The Pyro VAE tutorial's encoder: softplus hidden layer, loc and exp(.) scale heads."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(DATA_DIM, HIDDEN)
        self.fc21 = nn.Linear(HIDDEN, LATENT)
        self.fc22 = nn.Linear(HIDDEN, LATENT)

    def forward(self, x):
        hidden = F.softplus(self.fc1(x))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class TutorialDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(LATENT, HIDDEN)
        self.fc21 = nn.Linear(HIDDEN, DATA_DIM)

    def forward(self, z):
        return torch.sigmoid(self.fc21(F.softplus(self.fc1(z))))


class TutorialVAE(nn.Module):
    """Model and guide exactly as the Pyro VAE tutorial writes them."""

    def __init__(self):
        super().__init__()
        self.encoder = TutorialEncoder()
        self.decoder = TutorialDecoder()

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], LATENT)))
            z_scale = x.new_ones(torch.Size((x.shape[0], LATENT)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


def elbogap_pair():
    return VAE(DATA_DIM, LATENT, (HIDDEN,)), MeanFieldGuide(DATA_DIM, LATENT, (HIDDEN,))


def make_train_steps(lr: float = 1e-3) -> dict:
    """name -> step(x) for each contender, each with fresh parameters."""
    pyro.clear_param_store()
    vae, enc = elbogap_pair()
    elbogap = ElboStep(vae.model, enc.guide, TRAIN_SIZE, lr=lr)

    tutorial = TutorialVAE()
    svi = pyro.infer.SVI(tutorial.model, tutorial.guide, pyro.optim.Adam({"lr": lr}),
                         pyro.infer.Trace_ELBO())

    return {"elbogap fit step": elbogap, "stock Pyro SVI(Trace_ELBO)": svi.step,
            "hand-written PyTorch": hand_written_step(lr, fused=False),
            "hand-written PyTorch, fused Adam": hand_written_step(lr, fused=True)}


def hand_written_step(lr: float, fused: bool):
    """The same one-sample ELBO step written directly in PyTorch (Adam as torch's default, or
    fused as elbogap uses it)."""
    vae, enc = elbogap_pair()
    params = list(vae.parameters()) + list(enc.parameters())
    optimizer = torch.optim.Adam(params, lr=lr, fused=fused)

    def step(x):
        loc, scale = enc.encode(x)
        z = loc + scale * torch.randn_like(loc)
        log_px = -F.binary_cross_entropy_with_logits(vae.decoder(z), x, reduction="none").sum(-1)
        log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
        log_qz = (-0.5 * (((z - loc) / scale).pow(2) + LOG_2PI) - scale.log()).sum(-1)
        loss = -(TRAIN_SIZE / x.shape[0]) * (log_px + log_pz - log_qz).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def hand_written_log_evidence(vae: VAE, enc: MeanFieldGuide, x: torch.Tensor, k: int,
                              rows_per_chunk: int, contraction: bool = False
                              ) -> torch.Tensor:
    """Batched importance sampling written directly in PyTorch, chunked over particles; with
    ``contraction`` the Bernoulli log-likelihood as sum x*l - sum softplus(l) (the fastest
    eager form known here) instead of PyTorch's binary cross-entropy."""
    with torch.no_grad():
        loc, scale = enc.encode(x)
        chunk = max(1, rows_per_chunk // x.shape[0])
        parts = []
        for start in range(0, k, chunk):
            m = min(chunk, k - start)
            eps = torch.randn(m, *loc.shape, device=x.device)
            z = loc + scale * eps
            logits = vae.decoder(z)
            if contraction:
                log_px = torch.einsum("knd,nd->kn", logits, x) - F.softplus(logits).sum(-1)
            else:
                log_px = -F.binary_cross_entropy_with_logits(
                    logits, x.expand(m, *x.shape), reduction="none").sum(-1)
            log_w = log_px - 0.5 * z.pow(2).sum(-1) + 0.5 * eps.pow(2).sum(-1) + scale.log().sum(-1)
            parts.append(log_w)
        return torch.logsumexp(torch.cat(parts), 0) - math.log(k)


def decoder_matmuls(vae: VAE, x: torch.Tensor, k: int, rows_per_chunk: int) -> None:
    """The floor: the decoder's two matrix products alone, same shapes and chunks, nothing else
    (no activation, no log-density, no sampling beyond z)."""
    first, second = vae.decoder[0], vae.decoder[2]
    with torch.no_grad():
        chunk = max(1, rows_per_chunk // x.shape[0])
        for start in range(0, k, chunk):
            z = torch.randn(min(chunk, k - start) * x.shape[0], LATENT, device=x.device)
            torch.addmm(second.bias, torch.addmm(first.bias, z, first.weight.t()),
                        second.weight.t())


def evidence_runner(name: str, x: torch.Tensor, k: int):
    """A zero-argument function computing log p(x) for all of x with contender ``name``, on
    x's device (waiting for a GPU to finish, so that the time is the computation's)."""
    pyro.clear_param_store()
    vae, enc = elbogap_pair()
    if x.device.type == "cuda":
        vae.to(x.device), enc.to(x.device)
        run = _evidence_runner(name, x, k, vae, enc)

        def synchronized():
            out = run()
            torch.cuda.synchronize(x.device)
            return out
        return synchronized
    return _evidence_runner(name, x, k, vae, enc)


def _evidence_runner(name: str, x: torch.Tensor, k: int, vae: VAE, enc: MeanFieldGuide):
    if name in ("elbogap evaluate", "elbogap evaluate, compiled"):
        compiled = True if name.endswith("compiled") else None

        def run():
            return evaluate(vae.model, enc.guide, x, num_samples=k, compiled=compiled,
                            batch_size=min(100, x.shape[0])).log_evidence

        if compiled:
            # Recording and compiling once, untimed (they are kept for later calls); every
            # timed call still checks its first chunk against the eager pass.
            run()
        return run
    rows = rows_per_chunk(x.device)
    if name == "hand-written PyTorch":
        return lambda: torch.cat([hand_written_log_evidence(vae, enc, x[s:s + 100], k, rows)
                                  for s in range(0, x.shape[0], 100)])
    if name == "hand-written PyTorch, contraction":
        return lambda: torch.cat([hand_written_log_evidence(vae, enc, x[s:s + 100], k, rows,
                                                            contraction=True)
                                  for s in range(0, x.shape[0], 100)])
    if name == "decoder matmuls alone":
        return lambda: [decoder_matmuls(vae, x[s:s + 100], k, rows)
                        for s in range(0, x.shape[0], 100)]
    if name == "pyro.infer.Importance":
        def run():
            out = []
            with torch.no_grad():
                for i in range(x.shape[0]):
                    importance = pyro.infer.Importance(vae.model, enc.guide, num_samples=k)
                    out.append(importance.run(x[i:i + 1]).get_log_normalizer())
            return torch.stack(out)
        return run
    raise ConfigError(f"unknown contender {name!r}")


# ---- measuring --------------------------------------------------------------------------------


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def train_step_gflop(batch: int) -> float:
    """Matmul FLOPs of one step: forward of encoder and decoder, backward twice that."""
    encoder = DATA_DIM * HIDDEN + HIDDEN * 2 * LATENT
    decoder = LATENT * HIDDEN + HIDDEN * DATA_DIM
    return 3 * 2 * batch * (encoder + decoder) / 1e9


def evidence_gflop_per_point(k: int) -> float:
    return 2 * k * (LATENT * HIDDEN + HIDDEN * DATA_DIM) / 1e9


def alternate(contenders: dict, rounds: int, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each contender, ``rounds`` medians-to-be, contenders interleaved."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            times[name].append((time.perf_counter() - start) / repeats)
    return times


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def probe(spec: dict) -> dict:
    """Run in a fresh process: time one evidence computation and its peak memory above set-up.

    Linux keeps the peak resident size in VmHWM; writing 5 to /proc/self/clear_refs resets it
    to the current size, so the peak seen afterwards belongs to the computation alone.
    """
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((spec["n"], DATA_DIM), 0.13))
    runner = evidence_runner(spec["contender"], x, spec["k"])
    evidence_runner(spec["contender"], x[:1], 20)()  # imports and first-call set-up, not timed
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    runner()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {"seconds": seconds, "points_per_second": spec["n"] / seconds,
            "peak_extra_mib": max(0, peak - baseline) / 1024}


def run_probe(spec: dict) -> dict:
    result = subprocess.run([sys.executable, __file__, "--probe", json.dumps(spec)],
                            capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"probe {spec} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def data_parallel_probe(spec: dict) -> dict | None:
    """Under torchrun (or alone): examples/s of ElboStep at ``batch`` points per process."""
    ctx = Distributed.from_environment()
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(ctx.rank)
    pyro.clear_param_store()
    vae, enc = elbogap_pair()
    step = ElboStep(vae.model, enc.guide, TRAIN_SIZE, lr=1e-3, distributed=ctx)
    batch = spec["batch"]
    x = torch.bernoulli(torch.full((batch, DATA_DIM), 0.13))
    for _ in range(spec["warmup"]):
        step(x, batch * ctx.world_size)
    ctx.barrier()
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        step(x, batch * ctx.world_size)
    seconds = ctx.mean(time.perf_counter() - start)
    params = sum(p.numel() for p in step._parameters())
    ctx.shutdown()
    if not ctx.is_main:
        return None
    return {"processes": ctx.world_size, "threads_per_process": spec["threads"],
            "batch_per_process": batch, "global_batch": batch * ctx.world_size,
            "examples_per_second": spec["steps"] * batch * ctx.world_size / seconds,
            "ms_per_step": 1000 * seconds / spec["steps"],
            "allreduce_bytes_per_step": 4 * (params + 1) if ctx.enabled else 0}


def data_parallel_section(args) -> list[dict]:
    rows = []
    for processes, threads in ((1, 2), (1, 1), (2, 1)):
        spec = {"threads": threads, "batch": args.dp_global_batch // processes,
                "steps": args.dp_steps, "warmup": args.dp_warmup}
        prefix = [sys.executable]
        if processes > 1:
            port = 29500 + int(time.time()) % 1000
            prefix += ["-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                       f"--master_port={port}"]
        result = subprocess.run([*prefix, __file__, "--dp-probe", json.dumps(spec)],
                                capture_output=True, text=True, timeout=3600)
        if result.returncode != 0:
            raise RuntimeError(f"data-parallel probe failed: {result.stderr[-2000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return rows


# ---- the report -------------------------------------------------------------------------------


def training_section(args, x_train: torch.Tensor, gflops: float) -> list[dict]:
    rows = []
    for batch in args.train_batches:
        g = torch.Generator().manual_seed(batch)
        x = x_train[torch.randint(0, x_train.shape[0], (batch,), generator=g)]
        steps = make_train_steps()
        times = alternate({n: (lambda f=f, x=x: f(x)) for n, f in steps.items()},
                          args.rounds, args.repeats, args.warmup)
        medians = {n: statistics.median(t) for n, t in times.items()}
        hand = medians["hand-written PyTorch"]
        for name, seconds in medians.items():
            achieved = train_step_gflop(batch) / seconds
            rows.append({"batch": batch, "contender": name, "ms_per_step": 1000 * seconds,
                         "ratio_to_hand_written": seconds / hand, "gflops": achieved,
                         "share_of_matmul_rate": achieved / gflops,
                         "rounds_ms": [1000 * t for t in times[name]]})
    return rows


def evidence_section(args, x_test: torch.Tensor) -> list[dict]:
    rows = []
    x_test = x_test.to(args.device)
    for k in args.evidence_k:
        contenders = {
            **{name: evidence_runner(name, x_test[: args.evidence_points], k)
               for name in ("elbogap evaluate", "elbogap evaluate, compiled",
                            "hand-written PyTorch", "hand-written PyTorch, contraction",
                            "decoder matmuls alone")},
            "pyro.infer.Importance": evidence_runner("pyro.infer.Importance",
                                                     x_test[: args.importance_points], k),
        }
        times = alternate(contenders, args.evidence_rounds, 1, 0)
        hand = statistics.median(times["hand-written PyTorch"]) / args.evidence_points
        floor = statistics.median(times["decoder matmuls alone"]) / args.evidence_points
        for name, t in times.items():
            n = args.importance_points if name == "pyro.infer.Importance" else args.evidence_points
            per_point = statistics.median(t) / n
            # Peak memory is measured in a fresh CPU process (VmHWM); on a GPU: none.
            memory = (run_probe({"contender": name, "k": k, "n": n}) if args.device.type == "cpu"
                      else {"peak_extra_mib": None})
            rows.append({"k": k, "contender": name, "points": n,
                         "points_per_second": 1 / per_point,
                         "ratio_to_hand_written": per_point / hand,
                         "ratio_to_matmuls": per_point / floor,
                         "gflops": evidence_gflop_per_point(k) / per_point,
                         "peak_extra_mib": memory["peak_extra_mib"]})
    return rows


def ais_step_runners(x: torch.Tensor, chains: int, beta: float = 0.5) -> dict:
    """One AIS leapfrog evaluation, log pi_beta(z) and its gradient for chains x points:
    elbogap's (read off Pyro traces of the pair) and the same written in PyTorch."""
    pyro.clear_param_store()
    vae, enc = elbogap_pair()
    path = annealing_path(vae.model, enc.guide, x, chains, "guide", "data")
    u0 = path.initial_state(key=0, first=0)

    def elbogap():
        u = {k: v.detach().requires_grad_(True) for k, v in u0.items()}
        with pyro.validation_enabled(False):
            joint, base, jac = path.terms(u)
        log_pi = (1 - beta) * base + beta * joint + jac
        return torch.autograd.grad(log_pi.sum(), list(u.values()))

    with torch.no_grad():
        loc, scale = enc.encode(x)
    z0 = u0["z"]

    def hand_written():
        z = z0.detach().requires_grad_(True)
        log_px = -F.binary_cross_entropy_with_logits(
            vae.decoder(z), x.expand(chains, *x.shape), reduction="none").sum(-1)
        log_pz = -0.5 * z.pow(2).sum(-1) - 0.5 * LATENT * math.log(2 * math.pi)
        log_q = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
        log_pi = (1 - beta) * log_q + beta * (log_px + log_pz)
        return torch.autograd.grad(log_pi.sum(), [z])

    return {"elbogap AIS step": elbogap, "hand-written PyTorch": hand_written}


def ais_section(args, x_test: torch.Tensor) -> list[dict]:
    x = x_test[: args.ais_points]
    times = alternate(ais_step_runners(x, args.ais_chains), args.rounds, args.repeats, args.warmup)
    hand = statistics.median(times["hand-written PyTorch"])
    return [{"contender": name, "chains": args.ais_chains, "points": x.shape[0],
             "ms_per_step": 1000 * statistics.median(t),
             "ratio_to_hand_written": statistics.median(t) / hand} for name, t in times.items()]


def scaling_section(args) -> list[dict]:
    rows = []
    for k in args.scaling_k:
        rows.append({"vary": "K", "k": k, "n": args.scaling_n_fixed,
                     **run_probe({"contender": "elbogap evaluate", "k": k,
                                  "n": args.scaling_n_fixed})})
    # Memory in K: one point, K up to 10^7 (a point's draws are reduced as they come).
    for k in args.memory_k:
        rows.append({"vary": "K, one point", "k": k, "n": 1,
                     **run_probe({"contender": "elbogap evaluate", "k": k, "n": 1})})
    for n in args.scaling_n:
        rows.append({"vary": "N", "k": args.scaling_k_fixed, "n": n,
                     **run_probe({"contender": "elbogap evaluate", "k": args.scaling_k_fixed,
                                  "n": n})})
    return rows


def calibration_section(args, x_test: torch.Tensor) -> list[dict]:
    pyro.clear_param_store()
    vae, enc = elbogap_pair()
    x = x_test[: args.calibration_points]
    return (calibration_cost.amortized_rows(vae, enc, x, args.calibration_simulations,
                                            args.evidence_rounds)
            + calibration_cost.refit_rows(args.vsbc_refits, args.vsbc_steps))


def _mib(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


SECTIONS = ("training", "evidence", "ais", "scaling", "data_parallel", "as_written",
            "calibration")


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['cores']} cores, torch {m['torch']} with {m['threads']} threads; "
        f"1024² float32 matmul: {m['matmul_gflops']:.0f} GFLOP/s. Data: {report['data']}.",
        "",
        "| training step | batch | ms / step | × hand-written | GFLOP/s | share of matmul rate |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['contender']} | {r['batch']} | {r['ms_per_step']:.2f} | "
              f"{r['ratio_to_hand_written']:.2f} | {r['gflops']:.0f} | "
              f"{100 * r['share_of_matmul_rate']:.0f} % |" for r in report.get("training", [])]
    lines += ["", "| log p(x) | K | points/s | × hand-written time | × decoder matmuls | GFLOP/s "
              "| peak extra MiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['contender']} | {r['k']} | {r['points_per_second']:.2f} | "
              f"{r['ratio_to_hand_written']:.2f} | {r.get('ratio_to_matmuls', float('nan')):.2f} | "
              f"{r['gflops']:.0f} | "
              f"{_mib(r['peak_extra_mib'])} |" for r in report.get("evidence", [])]
    lines += ["", "| AIS leapfrog evaluation (log pi and gradient) | chains × points | ms | "
              "× hand-written |", "|---|---:|---:|---:|"]
    lines += [f"| {r['contender']} | {r['chains']} × {r['points']} | {r['ms_per_step']:.2f} | "
              f"{r['ratio_to_hand_written']:.2f} |" for r in report.get("ais", [])]
    lines += ["", "| evaluate scaling | K | N | seconds | points/s | peak extra MiB |",
              "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| vary {r['vary']} | {r['k']} | {r['n']} | {r['seconds']:.2f} | "
              f"{r['points_per_second']:.2f} | {_mib(r['peak_extra_mib'])} |"
              for r in report.get("scaling", [])]
    lines += ["", "| data parallel | processes × threads | global batch | examples/s | ms / step | "
              "all-reduced per step |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| elbogap fit step | {r['processes']} × {r['threads_per_process']} | "
              f"{r['global_batch']} | {r['examples_per_second']:.0f} | {r['ms_per_step']:.2f} | "
              f"{r['allreduce_bytes_per_step'] / 2**20:.2f} MiB |"
              for r in report.get("data_parallel", [])]
    lines += programs_as_written.markdown_rows(report.get("as_written", []))
    lines += calibration_cost.markdown_rows(report.get("calibration", []))
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--data-dir", help="MNIST IDX directory; synthetic data of MNIST's shape if absent")
    p.add_argument("--out", default="runs/benchmark", help="directory for benchmark.json/.md")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs")
    p.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION",
                   help=f"run only these sections (of {', '.join(SECTIONS)})")
    add_device_flag(p, default="cpu", what="the evidence section")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--dp-probe", help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return p


def configure(args) -> None:
    quick = args.quick
    args.train_batches = (256, 32)
    args.rounds, args.repeats, args.warmup = (2, 2, 1) if quick else (7, 20, 10)
    args.evidence_k = (50,) if quick else (1000, 5000)
    args.evidence_points = 4 if quick else 100
    args.importance_points = 2 if quick else 3
    args.evidence_rounds = 1 if quick else 3
    args.ais_chains, args.ais_points = (4, 4) if quick else (16, 100)
    args.scaling_k = (10, 100) if quick else (100, 1000, 5000, 20000)
    args.scaling_n_fixed = 4 if quick else 20
    args.scaling_n = (2, 8) if quick else (10, 100, 1000)
    args.scaling_k_fixed = 20 if quick else 1000
    args.memory_k = (1000, 10_000) if quick else tuple(10**e for e in range(3, 8))
    args.dp_global_batch = 32 if quick else 256
    args.dp_steps, args.dp_warmup = (3, 1) if quick else (60, 10)
    args.as_written_k = 50 if quick else 1000
    args.as_written_chains, args.as_written_steps = (2, 5) if quick else (8, 200)
    args.vae_points = 10 if quick else 100
    args.calibration_points, args.calibration_simulations = (50, 100) if quick else (256, 2048)
    args.vsbc_refits, args.vsbc_steps = (2, 10) if quick else (5, 500)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.probe:
        print(json.dumps(probe(json.loads(args.probe))))
        return 0
    if args.dp_probe:
        result = data_parallel_probe(json.loads(args.dp_probe))
        if result is not None:
            print(json.dumps(result))
        return 0
    configure(args)
    # The evidence section runs on --device; training, scaling and data-parallel stay on CPU.
    args.device = resolve_device(args.device)
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    if args.data_dir:
        data = load_mnist(args.data_dir, "fixed")
        x_train, x_test, source = data.train, data.test, f"MNIST from {args.data_dir}"
    else:
        x_train = torch.bernoulli(torch.full((2048, DATA_DIM), 0.13))
        x_test = torch.bernoulli(torch.full((256, DATA_DIM), 0.13))
        source = "synthetic binary data of MNIST's shape (pixel mean 0.13)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pareto_khat(torch.randn(30, 1))  # ArviZ's import is a one-off cost, not evaluate's
    gflops = matmul_gflops()
    report = {
        "machine": {"cores": torch.get_num_threads(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "pyro": pyro.__version__,
                    "python": platform.python_version(), "matmul_gflops": gflops},
        "data": source,
        "quick": args.quick,
        "evidence_device": str(args.device) + (
            f" ({torch.cuda.get_device_name(args.device)})" if args.device.type == "cuda" else ""),
    }
    sections = {"training": lambda: training_section(args, x_train, gflops),
                "evidence": lambda: evidence_section(args, x_test),
                "ais": lambda: ais_section(args, x_test),
                "scaling": lambda: scaling_section(args),
                "data_parallel": lambda: data_parallel_section(args),
                "as_written": lambda: programs_as_written.section(args),
                "calibration": lambda: calibration_section(args, x_test)}
    for name in args.only or SECTIONS:
        report[name] = sections[name]()
    write_json_atomic(out / "benchmark.json", report)
    table = markdown(report)
    write_text_atomic(out / "benchmark.md", table)
    print(table)
    print(f"wrote {out / 'benchmark.json'} and benchmark.md")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, parser=parser))
