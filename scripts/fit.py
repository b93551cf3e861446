"""Train a model/guide pair with SVI and report its ELBO, KL, evidence and evidence gap.

With no arguments: the VAE on scikit-learn's bundled 8x8 digits (no download)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from elbogap import FitOptions, final_summary, new_run, train
from elbogap.cli.command_line import (
    CommandParser,
    add_common_flags,
    add_device_flag,
    add_training_controls,
    add_trust_flag,
    parse_hidden_dims,
    positive_number,
    run_main,
)
from elbogap.data.catalog import DATASETS
from elbogap.data.readers import BINARIZATIONS
from elbogap.foundations.distributed import Distributed
from elbogap.foundations.errors import ConfigError
from elbogap.presentation.table import format_run_summary
from elbogap.runs.run_directory import changed_settings, continued_run, run_settings


def parser() -> argparse.ArgumentParser:
    o = FitOptions()
    p = CommandParser(description=__doc__)
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=DATASETS, default="digits",
                   help="data set: digits (bundled), synthetic (drawn from a fixed linear-Gaussian "
                        "model, D=10, k=3), or read from --data-dir")
    g.add_argument("--data-dir", help="directory of the files (mnist, binarized_mnist), "
                   "frey_rawface.mat, or a .npy/.npz/.csv matrix for --data array")
    g.add_argument("--binarize", choices=BINARIZATIONS, default="dynamic",
                   help="how --data mnist is binarized")
    g.add_argument("--val-fraction", type=float,
                   help="share of the training set held out as a validation split, which the "
                        "diagnostics during training then watch instead of the test set")
    g = p.add_argument_group("model and guide")
    g.add_argument("--model", default="vae", help="a registered model (vae, linear-gaussian), "
                   "path/to/file.py:name or package.module:name returning (model, guide)")
    g.add_argument("--guide", help="a registered guide: mean-field (MLP encoder), full-rank "
                   "(Cholesky factor from the encoder), iaf (--flows conditional IAF layers), linear, "
                   "optimal-mean-field (linear-gaussian only), or one of Pyro's autoguides built "
                   "around the model: auto-normal, auto-diagonal-normal, auto-multivariate-normal, "
                   "auto-lowrank-multivariate-normal; default: the model's own")
    g.add_argument("--flows", type=int, help="IAF layers of --guide iaf (default 2)")
    g.add_argument("--data-plate", default=o.data_plate,
                   help="the plate over data points, where several could be it")
    g.add_argument("--likelihood", choices=("auto", "bernoulli", "gaussian"), default="auto",
                   help="observation model; auto: bernoulli for binary data, else gaussian")
    g.add_argument("--likelihood-scale", type=positive_number, help="fixed standard deviation of the "
                   "gaussian likelihood (default: learned per pixel)")
    g.add_argument("--latent-dim", type=int, help="latent dimensions (default: 50; 10 for data "
                   "of < 400 pixels; 3 for synthetic)")
    g.add_argument("--hidden-dims", help="comma-separated hidden layer "
                   "sizes, '' for none (default: 400, or 200 for data of < 400 pixels)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help=f"epochs in all (default {o.epochs}; with --resume: "
                   "the run's)")
    g.add_argument("--batch-size", type=int, default=o.batch_size,
                   help="data points per SVI step (per process under torchrun)")
    g.add_argument("--lr", type=float, default=o.lr, help="Adam learning rate")
    g.add_argument("--seed", type=int, default=o.seed, help="fixes every random number on CPU")
    g.add_argument("--no-jit", dest="jit", action="store_false", help="run the pair's Python on "
                   "every step instead of replaying a checked recording of the loss (README, Performance)")
    g.add_argument("--time-budget", type=positive_number, dest="time_budget_minutes",
                   help="stop training after the epoch that exceeds this many minutes")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    add_device_flag(g)
    add_training_controls(p, o)
    g = p.add_argument_group("diagnostics")
    g.add_argument("--num-samples", "-K", type=int, default=1000,
                   help="K, importance samples per test point in the final evaluation")
    g.add_argument("--eval-every", type=int, default=o.eval_every,
                   help="epochs between the full diagnostics during training (default: as "
                        "often as keeps them within 10 %% of the training time; the first and "
                        "last epoch always)")
    g.add_argument("--eval-samples", type=int, default=o.eval_samples,
                   help="K for the diagnostics during training")
    g.add_argument("--eval-points", type=int, default=o.eval_points, help="points diagnosed "
                   "during training (a fixed random subset, seed 0)")
    g.add_argument("--test-points", type=int, help="test points in the final evaluation, a fixed "
                   "random subset (seed 0); default: all of them")
    g.add_argument("--eval-batch-size", type=int, default=100,
                   help="test points per pass in the final evaluation")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="run directory (default: runs/DATA-MODEL-TIME)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its "
                   "checkpoint with its own settings; with --out RUN_DIR too, start it there if "
                   "it has none yet (safe under torchrun restarts)")
    add_trust_flag(p)
    add_common_flags(p)
    return p


# What --resume may change; every other setting is the run's own.
RESUME_FLAGS = {"resume", "out", "epochs", "no_progress", "debug", "threads", "overwrite",
                "time_budget_minutes", "device", "trust_code", "trust_model_file"}


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
        raise ConfigError(f"--resume {args.resume}: no such run directory (mistyped?). To start a "
                          "run there that restarts then resume (torchrun --max-restarts), pass "
                          f"--out {args.resume} too")
    defaults = vars(parser().parse_args([]))
    given = {k: v for k, v in vars(args).items() if k not in RESUME_FLAGS and v != defaults[k]}
    if ignored := changed_settings(Path(args.resume), given):
        raise ConfigError(f"--resume continues the run with its own settings, so "
                          f"{', '.join('--' + n.replace('_', '-') for n in ignored)} would be "
                          "ignored: leave them out, or start a new run with --out")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.hidden_dims is not None:
        args.hidden_dims = parse_hidden_dims(args.hidden_dims)
    check_flags(args)
    budget = args.time_budget_minutes * 60 if args.time_budget_minutes is not None else None
    ctx = Distributed.from_environment(args.device, threads=args.threads)
    with ctx.session():
        continued = args.resume and continued_run(
            args.resume, args.epochs, budget, ctx, trust_code=args.trust_code,
            trust_model_file=args.trust_model_file, overwrite=args.overwrite)
        if continued:
            run, options = continued
        else:
            if args.resume:
                ctx.say(f"no run in {args.resume} yet: starting it there")
                args.out = args.resume
            settings = {**run_settings(vars(args)), "time_budget": budget}
            run, options = new_run(settings, args.out, args.overwrite, ctx)
            ctx.say(f"run directory: {run.dir}" + (f" ({ctx.world_size} processes)"
                                                  if ctx.enabled else ""))
        options.progress, options.device = not args.no_progress and ctx.is_main, str(ctx.device)
        train(run, options, ctx)
        summary = final_summary(run, options.progress, ctx)
    if summary is None:
        return 0
    print(format_run_summary(summary))
    print(f"wrote {run.dir}/: config.json metrics.jsonl checkpoint.pt diagnostics.json *.png")
    return 0


def command(argv: list[str] | None = None) -> int:
    # load_dataset names the data's path what the command line calls --data-dir.
    return run_main(main, argv, parser=parser, aliases={"path": "--data-dir"})


if __name__ == "__main__":
    sys.exit(command())
