"""Train a model/guide pair with SVI and report its ELBO, KL, evidence and evidence gap.

With no arguments: the VAE on scikit-learn's bundled 8x8 digits (no download).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    SYNTHETIC_LATENT,
    HelpFormatter,
    build_pair,
    default_guide,
    exact_means,
    format_exact_comparison,
    format_predictive,
    format_summary,
    load_data,
    load_run,
    parse_hidden_dims,
    run_figures,
    run_main,
    run_split,
    synthetic_truth,
)

from inference.data.datasets import BINARIZATIONS  # noqa: E402
from inference.diagnostics.evaluation import evaluate  # noqa: E402
from inference.diagnostics.predictive import posterior_predictive  # noqa: E402
from inference.errors import ConfigError, ElbogapError  # noqa: E402
from inference.outputs.atomic import write_json_atomic  # noqa: E402
from inference.outputs.plotting import save_figure  # noqa: E402
from inference.training.checkpoint import rng_preserved  # noqa: E402
from inference.training.distributed import Distributed  # noqa: E402
from inference.training.fitting import (  # noqa: E402
    CHECKPOINT,
    METRICS,
    FitOptions,
    diagnosed_points,
    fit,
    plan_evaluation,
)

DATASETS = ("digits", "synthetic", "mnist", "binarized_mnist", "frey_face", "array")


def parser() -> argparse.ArgumentParser:
    defaults = FitOptions()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    data = p.add_argument_group("data")
    data.add_argument("--data", choices=DATASETS, default="digits",
                      help="data set: digits (bundled), synthetic (drawn from a fixed "
                           "linear-Gaussian model, D=10, k=3), or read from --data-dir")
    data.add_argument("--data-dir",
                      help="directory of the files (mnist, binarized_mnist), frey_rawface.mat, "
                           "or a .npy/.npz/.csv matrix for --data array")
    data.add_argument("--binarize", choices=BINARIZATIONS, default="dynamic",
                      help="how --data mnist is binarized")
    pair = p.add_argument_group("model and guide")
    pair.add_argument("--model", default="vae",
                      help="a registered model (vae, linear-gaussian) or path/to/file.py:name "
                           "returning (model, guide)")
    pair.add_argument("--guide",
                      help="a registered guide: mean-field (MLP encoder), linear, "
                           "optimal-mean-field (linear-gaussian only), or one of Pyro's "
                           "autoguides built around the model: auto-normal, "
                           "auto-diagonal-normal, auto-multivariate-normal, "
                           "auto-lowrank-multivariate-normal; default: the model's own")
    pair.add_argument("--data-plate", default=defaults.data_plate,
                      help="name of the pyro.plate over data points in model and guide")
    pair.add_argument("--likelihood", choices=("auto", "bernoulli", "gaussian"), default="auto",
                      help="observation model; auto: bernoulli for binary data, else gaussian")
    pair.add_argument("--likelihood-scale", type=float,
                      help="fixed standard deviation of the gaussian likelihood (default: learned "
                           "per pixel)")
    pair.add_argument("--latent-dim", type=int,
                      help="latent dimensions (default: 50; 10 for data of < 400 pixels; 3 for "
                           "synthetic)")
    pair.add_argument("--hidden-dims",
                      help="comma-separated hidden layer sizes, '' for none "
                           "(default: 400, or 200 for data of < 400 pixels)")
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int,
                       help=f"epochs in all (default {defaults.epochs}; with --resume: the run's)")
    train.add_argument("--batch-size", type=int, default=defaults.batch_size,
                       help="data points per SVI step (per process under torchrun)")
    train.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate")
    train.add_argument("--num-particles", type=int, default=defaults.num_particles,
                       help="ELBO samples per step")
    train.add_argument("--elbo", choices=("trace", "meanfield", "enum"), default=defaults.elbo,
                       help="Trace_ELBO, TraceMeanField_ELBO (analytic KL in the loss) or "
                            "TraceEnum_ELBO (guides with config_enumerate'd discrete sites)")
    train.add_argument("--seed", type=int, default=0, help="fixes every random number on CPU")
    train.add_argument("--no-jit", dest="jit", action="store_false",
                       help="run the pair's Python on every step instead of replaying a checked "
                            "recording of the loss (see README, Performance)")
    train.add_argument("--time-budget", type=float, dest="time_budget_minutes",
                       help="stop training after the epoch that exceeds this many minutes")
    train.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ev = p.add_argument_group("diagnostics")
    ev.add_argument("--num-samples", "-K", type=int, default=1000,
                    help="K, importance samples per test point in the final evaluation")
    ev.add_argument("--eval-every", type=int, default=defaults.eval_every,
                    help="epochs between diagnostics during training")
    ev.add_argument("--eval-samples", type=int, default=defaults.eval_samples,
                    help="K for the diagnostics during training")
    ev.add_argument("--eval-points", type=int, default=defaults.eval_points,
                    help="test points diagnosed during training (a fixed random subset, seed 0)")
    ev.add_argument("--test-points", type=int,
                    help="test points in the final evaluation, a fixed random subset (seed 0); "
                         "default: all of them")
    ev.add_argument("--eval-batch-size", type=int, default=100,
                    help="test points per pass in the final evaluation")
    out = p.add_argument_group("output")
    out.add_argument("--out", help="run directory (default: runs/DATA-MODEL-TIME)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    out.add_argument("--resume", metavar="RUN_DIR",
                     help="continue the run in RUN_DIR from its checkpoint with its own settings; "
                          "with --out RUN_DIR too, start it there if it has none yet (safe under "
                          "torchrun restarts)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return p


def make_config(args: argparse.Namespace, data) -> dict:
    small = data.data_dim < 400
    likelihood = data.likelihood if args.likelihood == "auto" else args.likelihood
    hidden = args.hidden_dims if args.hidden_dims is not None else ("200" if small else "400")
    model = args.model
    if ":" in model and model.rsplit(":", 1)[0].endswith(".py"):
        path, _, name = model.rpartition(":")
        model = f"{Path(path).resolve()}:{name}"
    config = {
        "data": args.data,
        "data_dir": str(Path(args.data_dir).resolve()) if args.data_dir else None,
        "binarize": args.binarize,
        "model": model,
        "guide": args.guide or default_guide(args.model),
        "likelihood": likelihood,
        "likelihood_scale": args.likelihood_scale,
        "latent_dim": args.latent_dim if args.latent_dim is not None else (
            SYNTHETIC_LATENT if args.data == "synthetic" else 10 if small else 50
        ),
        "hidden_dims": list(parse_hidden_dims(hidden)),
        "seed": args.seed,
        "num_samples": args.num_samples,
        "test_points": args.test_points,
        "eval_batch_size": args.eval_batch_size,
    }
    for f in fields(FitOptions):
        if hasattr(args, f.name):
            config[f.name] = getattr(args, f.name)
    if config["epochs"] is None:
        config["epochs"] = FitOptions.epochs
    return config


def prepare_run_dir(args: argparse.Namespace) -> Path:
    if args.out:
        run_dir = Path(args.out)
    else:
        run_dir = Path("runs") / f"{args.data}-{Path(args.model).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir.is_file():
        raise ConfigError(f"--out {run_dir}: is a file, not a directory")
    held = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    if held == {"config.json"}:
        # A run that failed before its first epoch (its config is all it wrote): nothing to keep.
        print(f"note: {run_dir} holds only the config of a run that never completed an epoch; "
              "starting anew there")
    elif held and not args.overwrite:
        raise ConfigError(
            f"--out {run_dir}: already holds a run; pass --overwrite to replace it, or another --out"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {run_dir}: cannot write there ({e.strerror})") from None
    return run_dir


def write_plots(run_dir: Path, history: list[dict], summary: dict, pair, data,
                held_out: bool) -> None:
    for name, fig in run_figures(history, summary["kl_per_dim"], pair, data, held_out).items():
        save_figure(fig, run_dir / name)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be a positive integer, got {args.num_samples}")
    if args.test_points is not None and args.test_points < 1:
        raise ConfigError(f"--test-points must be a positive integer, got {args.test_points}")
    if args.eval_batch_size < 1:
        raise ConfigError(f"--eval-batch-size must be a positive integer, got {args.eval_batch_size}")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    ctx = Distributed.from_environment()
    try:
        return train_and_report(args, ctx)
    finally:
        ctx.shutdown()


ANNOUNCE_AFTER_SECONDS = 30


def announce_final_evaluation(pair, x, split: str, config: dict, options, processes: int) -> None:
    """Say what the final evaluation will cost when it is long (10 000 MNIST points at K = 1000
    take minutes on a CPU), timed on a few points without moving any random stream."""
    k, probe_k = config["num_samples"], min(config["num_samples"], 50)
    probe = x[: min(x.shape[0], 20)]
    start = time.perf_counter()
    try:
        with rng_preserved():
            evaluate(pair.model, pair.guide, probe, num_samples=probe_k,
                     data_plate=options.data_plate)
    except ElbogapError:
        return  # a guide that runs only on its whole data set: no estimate
    seconds = ((time.perf_counter() - start) * x.shape[0] * k
               / (probe.shape[0] * probe_k * processes))
    if seconds > ANNOUNCE_AFTER_SECONDS:
        print(f"final evaluation: {x.shape[0]} {split} points x K={k}, about "
              f"{seconds / 60:.1f} min here (--num-samples and --test-points bound it)")


def check_likelihood(likelihood: str, data) -> None:
    if likelihood != "bernoulli":
        return
    # Dynamically binarized training data holds grey levels, drawn to 0/1 every epoch.
    for split in (data.test,) if data.dynamic_binarization else (data.train, data.test):
        if not ((split == 0) | (split == 1)).all():
            low, high = split.min().item(), split.max().item()
            raise ConfigError(
                f"--likelihood bernoulli needs data of 0s and 1s, but data set '{data.name}' has "
                f"values from {low:g} to {high:g}: binarize it (for mnist: --binarize), or use "
                "--likelihood gaussian"
            )


def resume_run(args: argparse.Namespace, ctx: Distributed):
    """The saved run in --resume, ready to continue: config, data, pair, options, state."""
    run_dir = Path(args.resume)
    config, data, pair, state = load_run(run_dir)
    options = FitOptions(**config["fit_options"])
    if args.epochs is not None:
        options.epochs = args.epochs
    if args.time_budget_minutes is not None:
        options.time_budget = args.time_budget_minutes * 60
    options.check(data.train.shape[0], ctx.world_size)
    metrics = run_dir / METRICS
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    state["history"] = [json.loads(line) for line in lines if line.strip()]
    if ctx.is_main:
        print(f"resuming {run_dir} after epoch {state['epoch']} of {options.epochs}")
    return run_dir, config, data, pair, options, state


def start_run(args: argparse.Namespace, ctx: Distributed):
    # The same seed on every rank: the same initial parameters (fit varies the draws per rank).
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    data = load_data(args.data, args.data_dir, args.binarize)
    config = make_config(args, data)
    check_likelihood(config["likelihood"], data)
    pair = build_pair(config, data)
    options = FitOptions(**{f.name: config[f.name] for f in fields(FitOptions)
                            if f.name in config})
    if args.time_budget_minutes is not None:
        options.time_budget = args.time_budget_minutes * 60
    options.check(data.train.shape[0], ctx.world_size)
    # Where the fitted pair can be diagnosed (a clear error now if the pair breaks a rule).
    config["evaluated_on"] = plan_evaluation(pair.model, pair.guide, data, options).split
    run_dir = ctx.on_main(lambda: prepare_run_dir(args))
    if ctx.is_main:
        write_json_atomic(run_dir / "config.json", {**config, "fit_options": asdict(options),
                                                    "processes": ctx.world_size})
        print(f"run directory: {run_dir}" + (f" ({ctx.world_size} processes)" if ctx.enabled
                                             else ""))
    return run_dir, config, data, pair, options, None


# What --resume may change; every other setting is the run's own.
RESUME_FLAGS = {"resume", "out", "epochs", "no_progress", "debug", "threads",
                "time_budget_minutes"}


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flags that would be silently ignored."""
    if not args.resume:
        if args.data_dir is not None and args.data in ("digits", "synthetic"):
            raise ConfigError(f"--data-dir is for data read from files (--data mnist, "
                              f"binarized_mnist, frey_face, array); --data {args.data} needs none")
        return
    if args.out and Path(args.out) != Path(args.resume):
        raise ConfigError("--resume RUN_DIR continues RUN_DIR: leave out --out, or give the same")
    if not Path(args.resume).is_dir() and not args.out:
        raise ConfigError(
            f"--resume {args.resume}: no such run directory (mistyped?). To start a run there that "
            f"restarts then resume (torchrun --max-restarts), pass --out {args.resume} too")
    defaults = parser().parse_args([])
    ignored = [name for name, value in vars(args).items()
               if name not in RESUME_FLAGS and value != getattr(defaults, name)]
    if ignored and (Path(args.resume) / CHECKPOINT).is_file():
        flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
        raise ConfigError(f"--resume continues the run with its own settings, so {flags} would be "
                          "ignored: leave them out, or start a new run with --out")


def train_and_report(args: argparse.Namespace, ctx: Distributed) -> int:
    check_flags(args)
    resuming = args.resume and (Path(args.resume) / CHECKPOINT).is_file()
    if args.resume and not resuming:
        if ctx.is_main:
            print(f"no checkpoint in {args.resume} yet: starting the run there")
        args.out, args.overwrite = args.resume, True
    run_dir, config, data, pair, options, state = (
        resume_run if resuming else start_run)(args, ctx)
    options.progress = not args.no_progress and ctx.is_main
    args.data = config["data"]

    split = run_split(config)
    eval_x = diagnosed_points(data, split, options.eval_points)
    x_final = diagnosed_points(data, split, config.get("test_points"))

    def add_exact(record: dict) -> None:
        if "diagnostics" in record and (exact := exact_means(pair.exact(eval_x))) is not None:
            record["exact"] = exact

    result = fit(pair.model, pair.guide, data, options, run_dir, on_epoch=add_exact,
                 distributed=ctx, resume=state)
    if ctx.is_main:
        announce_final_evaluation(pair, x_final, split, config, options, ctx.world_size)
    diagnostics = evaluate(pair.model, pair.guide, x_final, num_samples=config["num_samples"],
                           batch_size=config["eval_batch_size"], progress=options.progress,
                           data_plate=options.data_plate, distributed=ctx)
    if not ctx.is_main:
        return 0
    summary = {"data": args.data, "split": split, **diagnostics.summary()}
    exact = pair.exact(x_final)
    if exact is not None:
        summary["exact"] = exact_means(exact)
    if args.data == "synthetic":
        with torch.no_grad():
            truth = synthetic_truth().log_evidence(data.test).double().mean().item()
        summary["data_generating_log_evidence"] = truth
    predictive = None
    if diagnostics.unit == "data set" and data.test.shape[0]:
        # Held-out points have no evidence gap under a global guide: their posterior
        # predictive density is what can be said of them.
        with torch.no_grad():
            predictive = posterior_predictive(
                pair.model, pair.guide, data.test, num_samples=config["num_samples"],
                batch_size=config["eval_batch_size"], data_plate=options.data_plate).summary()
        summary["held_out_predictive"] = predictive
    write_json_atomic(run_dir / "diagnostics.json", summary)
    write_plots(run_dir, result.history, summary, pair, data, split == "test")
    print(format_summary(summary))
    if predictive is not None:
        print(format_predictive(predictive))
    if exact is not None:
        print(format_exact_comparison(diagnostics, exact))
    if args.data == "synthetic" and diagnostics.unit == "data point":
        print(f"log p(x) under the model that generated the data: {truth:.4f}")
    print(f"wrote {run_dir}/: config.json metrics.jsonl checkpoint.pt diagnostics.json *.png")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
