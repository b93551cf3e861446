"""Data-parallel training and evaluation: 2 processes, gloo over loopback."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.multiprocessing as mp

from elbogap.data.dataset import Dataset
from elbogap.data.readers import load_digits
from elbogap.diagnostics.evaluation import evaluate
from elbogap.foundations.distributed import Distributed
from elbogap.guides.mean_field import MeanFieldGuide
from elbogap.models.vae import VAE
from elbogap.training.elbo_step import ElboStep
from elbogap.training.fitting import FitOptions, fit
from tests.limits import HANG_SECONDS

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, port: int) -> Distributed:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    return Distributed.from_environment()


def spawn(worker, tmp_path, *args):
    mp.spawn(worker, args=(free_port(), str(tmp_path), *args), nprocs=WORLD, join=True)
    return [torch.load(Path(tmp_path) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def deterministic_model(x):
    """z_n ~ N(0, 1), x_n | z_n ~ N(w z_n + b, 1)."""
    w = pyro.param("w", torch.tensor(0.5))
    b = pyro.param("b", torch.tensor(0.1))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(w * z + b, 1.0), obs=x)


def deterministic_guide(x):
    """q(z_n | x_n) = Delta(a x_n): the ELBO, and so every gradient, is free of noise."""
    a = pyro.param("a", torch.tensor(0.3))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Delta(a * x))


GLOBAL_BATCH = torch.linspace(-2, 3, 7)  # 7 points: shards of 4 and 3


def one_step_worker(rank, port, out):
    ctx = join(rank, port)
    pyro.clear_param_store()
    step = ElboStep(deterministic_model, deterministic_guide, 100, lr=0.1, distributed=ctx)
    losses = [step(GLOBAL_BATCH[ctx.shard(7)], 7) for _ in range(3)]
    params = {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}
    torch.save({"losses": losses, "params": params}, Path(out) / f"rank{rank}.pt")
    ctx.shutdown()


def test_a_step_on_two_ranks_is_the_single_process_step_on_the_global_batch(tmp_path):
    ranks = spawn(one_step_worker, tmp_path)
    pyro.clear_param_store()
    step = ElboStep(deterministic_model, deterministic_guide, 100, lr=0.1)
    losses = [step(GLOBAL_BATCH) for _ in range(3)]
    params = {n: p.detach() for n, p in pyro.get_param_store().named_parameters()}
    for result in ranks:
        assert result["losses"] == pytest.approx(losses, rel=1e-6)
        for name, value in params.items():
            torch.testing.assert_close(result["params"][name], value, rtol=1e-6, atol=1e-7)


def small_digits():
    data = load_digits()
    return Dataset("digits", data.train[:203], data.test[:31], (8, 8), "bernoulli")


def fit_worker(rank, port, out):
    ctx = join(rank, port)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae, enc = VAE(64, 4, (16,)), MeanFieldGuide(64, 4, (16,))
    if rank == 1:  # a different start on rank 1: rank 0's parameters must win
        with torch.no_grad():
            for p in list(vae.parameters()) + list(enc.parameters()):
                p.add_(1.0)
    options = FitOptions(epochs=2, batch_size=25, eval_every=1, eval_samples=20, progress=False)
    result = fit(vae.model, enc.guide, small_digits(), options, Path(out) / "run",
                 distributed=ctx)
    params = {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}
    d = evaluate(vae.model, enc.guide, small_digits().test, num_samples=30, distributed=ctx)
    torch.save({"params": params, "history": result.history, "kl": d.kl_prior,
                "elbo": d.elbo}, Path(out) / f"rank{rank}.pt")
    ctx.shutdown()


def test_training_keeps_ranks_identical_and_evaluation_returns_every_point_in_order(tmp_path):
    (tmp_path / "run").mkdir()
    rank0, rank1 = spawn(fit_worker, tmp_path)
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
    # Metrics are global: the same on every rank; only rank 0 wrote them.
    assert [r["train_elbo"] for r in rank0["history"]] == [r["train_elbo"] for r in rank1["history"]]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    # Evaluation on 2 ranks: all 31 points, each once, in order. The analytic KL depends only on
    # the encoder, so it must equal the single-process evaluation exactly.
    assert rank0["kl"].shape == (31,)
    torch.testing.assert_close(rank0["kl"], rank1["kl"])
    pyro.clear_param_store()
    vae, enc = VAE(64, 4, (16,)), MeanFieldGuide(64, 4, (16,))
    with torch.no_grad():
        trace = pyro.poutine.trace(enc.guide).get_trace(small_digits().test)
        pyro.poutine.trace(pyro.poutine.replay(vae.model, trace)).get_trace(small_digits().test)
        store = dict(pyro.get_param_store().named_parameters())
        for name, value in rank0["params"].items():
            store[name].copy_(value)
    single = evaluate(vae.model, enc.guide, small_digits().test, num_samples=30)
    torch.testing.assert_close(rank0["kl"], single.kl_prior)


def test_shards_cover_every_index_once():
    for size in (0, 1, 5, 7, 64):
        for world in (1, 2, 3):
            covered = [i for r in range(world)
                       for i in range(size)[Distributed(r, world).shard(size)]]
            assert covered == list(range(size))


@pytest.mark.slow
def test_torchrun_runs_fit_evaluate_ais_bdmc_and_report(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={free_port()}", str(ROOT / "scripts" / "fit.py"),
               "--epochs", "2", "--batch-size", "50", "--num-samples", "20",
               "--eval-samples", "10", "--no-progress", "--seed", "3", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run directory:") == 1  # rank 0 alone reports
    assert (out / "diagnostics.json").is_file() and (out / "checkpoint.pt").is_file()
    config = (out / "config.json").read_text()
    assert '"processes": 2' in config
    # AIS, BDMC and the report on the run, under torchrun and in one process: the keyed
    # estimators' numbers are the same.
    scripts = {"evaluate.py": ["--method", "ais", "--bdmc", "--points", "5", "--chains", "2",
                               "--ais-steps", "4", "-K", "10", "--max-points", "20"],
               "report.py": ["-K", "10", "--max-points", "20", "--ais-points", "4",
                             "--ais-steps", "3", "--ais-chains", "2", "--amortization-points",
                             "6", "--amortization-steps", "5", "--idata-points", "2",
                             "--idata-draws", "10"]}
    written = {}
    for launcher in ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                      f"--master_port={free_port()}"], [sys.executable]):
        for script, flags in scripts.items():
            result = subprocess.run([*launcher, str(ROOT / "scripts" / script), str(out),
                                     *flags, "--no-progress"],
                                    capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stderr[-3000:]
            assert result.stdout.count("wrote") == (2 if script == "evaluate.py" else 1)
        for name in ("ais-test-C2-T4.json", "bdmc-C2-T4.json", "report.json"):
            written.setdefault(name, []).append(json.loads((out / name).read_text()))
    (ais2, ais1), (bdmc2, bdmc1), (report2, report1) = written.values()
    assert ais2["per_point"]["ais"] == pytest.approx(ais1["per_point"]["ais"], rel=1e-5)
    assert [bdmc2[k] for k in ("lower", "upper")] == pytest.approx(
        [bdmc1[k] for k in ("lower", "upper")], rel=1e-5)
    assert report2["ais"]["log_evidence"] == pytest.approx(report1["ais"]["log_evidence"],
                                                           rel=1e-5)
    assert report2["bdmc"]["lower"] == pytest.approx(report1["bdmc"]["lower"], rel=1e-5)
    for key in ("elbo_local", "elbo_amortized", "amortization_gap"):
        assert report2["gap_decomposition"][key] == pytest.approx(
            report1["gap_decomposition"][key], rel=1e-5), key


def test_benchmark_contenders_compute_the_same_evidence():
    """The hand-written batched estimator of benchmarks/benchmark.py agrees with evaluate."""
    from benchmarks import benchmark

    torch.manual_seed(0)
    vae, enc = benchmark.elbogap_pair()
    # q = p(z) and a decoder that depends on z only mildly: well-behaved importance weights, so
    # that the reported standard errors are trustworthy (k-hat small).
    with torch.no_grad():
        enc.head.weight.zero_()
        enc.head.bias[: benchmark.LATENT] = 0.0
        enc.head.bias[benchmark.LATENT :] = math.log(math.e - 1)  # softplus^-1(1)
        for layer in vae.decoder:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(0.1)
    x = torch.bernoulli(torch.full((6, benchmark.DATA_DIM), 0.13))
    ours = evaluate(vae.model, enc.guide, x, num_samples=3000)
    theirs = benchmark.hand_written_log_evidence(vae, enc, x, 3000, rows_per_chunk=500)
    assert (ours.khat < 0.5).all()
    assert ((ours.log_evidence - theirs).abs() < 4 * 2**0.5 * ours.log_evidence_se).all()


def small_pair():
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae, enc = VAE(64, 3, (16,)), MeanFieldGuide(64, 3, (16,))
    return vae, enc, small_digits().test[:7]


ANNEALING = {"num_chains": 3, "num_steps": 6, "leapfrog_steps": 2, "seed": 11}
REFITS = {"num_simulations": 5, "num_steps": 3, "num_draws": 10, "seed": 13}


def annealing_worker(rank, port, out):
    from elbogap.diagnostics.ais import annealed_evidence
    from elbogap.diagnostics.amortization import split_gap
    from elbogap.diagnostics.bdmc import bdmc
    from elbogap.diagnostics.vsbc import vsbc

    ctx = join(rank, port)
    vae, enc, x = small_pair()
    # Each rank's own stream differs: nothing may depend on it.
    pyro.set_rng_seed(100 + rank)
    a = annealed_evidence(vae.model, enc.guide, x, distributed=ctx, **ANNEALING)
    b = bdmc(vae.model, enc.guide, x, distributed=ctx, **ANNEALING)
    g = split_gap(vae.model, enc.guide, x, steps=5, num_samples=20, seed=5, group_size=3,
                  distributed=ctx)
    v = vsbc(vae.model, enc.guide, x, distributed=ctx, **REFITS)
    torch.save({"ais": a.log_weights, "lower": b.lower, "upper": b.upper,
                "local": g.elbo_local, "amortized": g.elbo_amortized,
                "vsbc": v.probabilities["z"]}, Path(out) / f"rank{rank}.pt")
    ctx.shutdown()


def test_ais_bdmc_and_the_gap_split_on_two_ranks_equal_one_process(tmp_path):
    """Each rank anneals and fits its share (VSBC's refits too); every point's (and refit's)
    numbers are keyed by the seed and the point alone, so two processes give the single
    process's numbers, on every rank."""
    from elbogap.diagnostics.ais import annealed_evidence
    from elbogap.diagnostics.amortization import split_gap
    from elbogap.diagnostics.bdmc import bdmc

    ranks = spawn(annealing_worker, tmp_path)
    vae, enc, x = small_pair()
    pyro.set_rng_seed(7)
    torch.set_num_threads(1)
    single = {"ais": annealed_evidence(vae.model, enc.guide, x, **ANNEALING).log_weights}
    b = bdmc(vae.model, enc.guide, x, **ANNEALING)
    single.update(lower=b.lower, upper=b.upper)
    g = split_gap(vae.model, enc.guide, x, steps=5, num_samples=20, seed=5, group_size=3)
    single.update(local=g.elbo_local, amortized=g.elbo_amortized)
    from elbogap.diagnostics.vsbc import vsbc

    single["vsbc"] = vsbc(vae.model, enc.guide, x, **REFITS).probabilities["z"]
    assert single["ais"].shape == (3, 7) and single["lower"].shape == (7,)
    for result in ranks:
        for name, value in single.items():
            torch.testing.assert_close(result[name], value, rtol=1e-6, atol=1e-6, msg=name)


# Rank 1 of the first attempt dies (SIGKILL) once two epochs are recorded; torchrun then stops
# rank 0 and starts both again with the same command.
DIES_ONCE = """
import os, pathlib, signal, sys, threading, time
from elbogap.cli.fit import command

out = pathlib.Path(sys.argv[sys.argv.index("--out") + 1])
if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    def die_after_two_epochs():
        while True:
            metrics = out / "metrics.jsonl"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.01)
    threading.Thread(target=die_after_two_epochs, daemon=True).start()
sys.exit(command(sys.argv[1:]))
"""


@pytest.mark.slow
def test_torchrun_restarts_the_run_with_the_command_that_started_it(tmp_path):
    """The README's pattern (c10d rendezvous, --max-restarts, --out D --resume D with the run's
    own flags repeated, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 against pytorch#135712): a rank
    killed mid-run, both restarted, the run ends with the numbers of a run never interrupted."""
    flags = ["--epochs", "4", "--batch-size", "50", "--num-samples", "20", "--eval-samples",
             "10", "--eval-every", "2", "--no-progress", "--seed", "3"]
    wrapper = tmp_path / "dies_once.py"
    wrapper.write_text(DIES_ONCE)
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    runs = {}
    for name, script in (("whole", ROOT / "scripts" / "fit.py"), ("restarted", wrapper)):
        out = tmp_path / name
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
             "--max-restarts=1", "--rdzv-backend=c10d",
             f"--rdzv-endpoint=localhost:{free_port()}", str(script), *flags,
             "--out", str(out), "--resume", str(out)],
            capture_output=True, text=True, timeout=HANG_SECONDS, cwd=ROOT, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = out, result
    out, result = runs["restarted"]
    assert "no run in" in result.stdout and "resuming" in result.stdout, result.stdout
    # Rank 0, stopped by torchrun, released the run or left it to be taken over: either way
    # nothing of its ownership remains.
    assert not (tmp_path / ".restarted.lock").exists()
    whole = runs["whole"][0]

    def records(run_dir):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert records(out) == records(whole)
    assert (json.loads((out / "diagnostics.json").read_text())
            == json.loads((whole / "diagnostics.json").read_text()))
