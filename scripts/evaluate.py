"""Reload a run's checkpoint and re-run the diagnostics, for example with a larger K.

Writes RUN_DIR/evaluation-SPLIT-K{K}.json (diagnostics.json of the run is left as it was).
"""

from __future__ import annotations

import argparse
import sys

import pyro

from elbogap import bdmc, diagnose, load_run
from elbogap.cli.command_line import (
    CommandParser,
    add_common_flags,
    add_device_flag,
    add_trust_flag,
    run_main,
)
from elbogap.diagnostics.ais import ais_beside_importance
from elbogap.foundations.atomic import write_json_atomic
from elbogap.foundations.distributed import Distributed
from elbogap.foundations.errors import ConfigError, check_positive
from elbogap.presentation.table import (
    format_annealed,
    format_bdmc,
    format_predictive,
    format_run_summary,
)
from elbogap.runs.diagnose import AIS_POINTS, annealing_points, predicts, split_points
from elbogap.runs.ownership import own


def parser() -> argparse.ArgumentParser:
    p = CommandParser(description=__doc__)
    p.add_argument("run_dir", help="a directory written by scripts/fit.py")
    p.add_argument("--num-samples", "-K", type=int, help="K (default: the run's --num-samples)")
    p.add_argument("--split", choices=("test", "train", "validation"),
                   help="default: where the run was diagnosed (train for a guide with parameters "
                        "per training point, or with global latents)")
    p.add_argument("--max-points", type=int, help="evaluate only this many points (a fixed "
                   "random subset, seed 0); not with global latents (the unit: the data set)")
    p.add_argument("--batch-size", type=int, default=100, help="data points per pass")
    p.add_argument("--data-plate", help="the plate over data points (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="fixes the guide's draws")
    p.add_argument("--defensive", type=float, default=0.0, metavar="A", help="share of the "
                   "proposal of log p(x) drawn from the prior p(z) (defensive importance "
                   "sampling: a second opinion where the guide may miss a mode)")
    p.add_argument("--no-compile", action="store_true", help="never compile the particles' pass "
                   "(compiled and checked where the evaluation would take over a minute)")
    p.add_argument("--train-mode", action="store_true", help="keep the pair's modules in "
                   "training mode (Dropout, BatchNorm) instead of evaluation mode")
    add_device_flag(p)
    a = p.add_argument_group("annealed importance sampling (AIS)")
    a.add_argument("--method", choices=("is", "ais"), default="is", help="is: importance "
                   "sampling with the guide (K draws); ais: AIS beside it on --points points")
    a.add_argument("--bdmc", action="store_true", help="bracket log p(x) of --points points "
                   "simulated from the model by forward and reverse AIS (BDMC)")
    a.add_argument("--ais-steps", type=int, default=500, help="intermediate distributions T")
    a.add_argument("--chains", type=int, default=16, help="AIS chains per point")
    a.add_argument("--ais-start", choices=("guide", "prior"), default="guide",
                   help="where the chains start (prior: for guides without a density)")
    a.add_argument("--points", type=int, help=f"points for AIS and BDMC (a fixed random subset, "
                   f"seed 0; default {AIS_POINTS}; with global latents the whole data set)")
    add_trust_flag(p)
    add_common_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    check_positive(num_samples=args.num_samples, batch_size=args.batch_size,
                   max_points=args.max_points, ais_steps=args.ais_steps, chains=args.chains,
                   points=args.points)
    if args.method != "ais" and not args.bdmc:
        p = parser()
        if ignored := [f"--{n.replace('_', '-')}" for n in ("points", "ais_steps", "chains",
                       "ais_start") if getattr(args, n) != p.get_default(n)]:
            raise ConfigError(f"{', '.join(ignored)}: for --method ais and --bdmc only; "
                              "add one of them, or leave those out")
    ctx = Distributed.from_environment(args.device)
    with ctx.session():
        # It writes into the run directory: not while another process (a fit) owns it.
        ctx.on_main(lambda: own(args.run_dir, "scripts/evaluate.py"))
        run = load_run(args.run_dir, trust_code=args.trust_code,
                       trust_model_file=args.trust_model_file)
        # After the pair is built (its initial weights draw from the same stream).
        pyro.set_rng_seed(args.seed + ctx.rank)
        k = args.num_samples or run.config["num_samples"]
        split = args.split or run.split
        x = split_points(run, split, args.max_points).to(ctx.device)
        plate = args.data_plate or run.options.data_plate
        if (args.method == "ais" or args.bdmc) and not predicts(run, split):
            return annealed(args, run, x, k, plate, ctx)
        diagnosis = diagnose(run, x, split, num_samples=k, batch_size=args.batch_size,
                             data_plate=plate, progress=not args.no_progress and ctx.is_main,
                             distributed=ctx, device=ctx.device, defensive=args.defensive,
                             train_mode=args.train_mode,
                             compiled=False if args.no_compile else None)
    if not ctx.is_main:
        return 0
    summary = diagnosis.summary()
    out = run.dir / diagnosis.file_name
    write_json_atomic(out, summary)
    print(format_predictive(summary) if diagnosis.predictive else format_run_summary(summary))
    print(f"wrote {out}")
    return 0


def annealed(args: argparse.Namespace, run, x, k: int, plate: str, ctx: Distributed) -> int:
    """--method ais and --bdmc: AIS beside importance sampling, and the BDMC bracket."""
    x = annealing_points(run, x, run.split, args.points)
    # AIS and BDMC are keyed by --seed point by point: the same numbers for any --nproc.
    settings = {"num_chains": args.chains, "num_steps": args.ais_steps, "start": args.ais_start,
                "data_plate": plate, "progress": not args.no_progress, "seed": args.seed,
                "distributed": ctx}
    tag = f"C{args.chains}-T{args.ais_steps}"
    if args.method == "ais":
        summary = ais_beside_importance(run.model, run.guide, x, num_samples=k,
                                        batch_size=args.batch_size, **settings)
        if ctx.is_main:
            out = run.dir / f"ais-{run.split}-{tag}.json"
            write_json_atomic(out, {"data": run.config["data"], **summary})
            print(format_annealed(summary, summary["importance"]))
            print(f"wrote {out}")
    if args.bdmc:
        bounds = bdmc(run.model, run.guide, x, **settings).summary()
        if ctx.is_main:
            out = run.dir / f"bdmc-{tag}.json"
            write_json_atomic(out, {"data": run.config["data"], **bounds})
            print(format_bdmc(bounds))
            print(f"wrote {out}")
    return 0


# Settings the library names otherwise than their flags.
ALIASES = {"num_steps": "--ais-steps", "num_chains": "--chains", "start": "--ais-start"}


def command(argv: list[str] | None = None) -> int:
    return run_main(main, argv, parser=parser, aliases=ALIASES)


if __name__ == "__main__":
    sys.exit(command())
