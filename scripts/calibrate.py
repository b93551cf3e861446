"""Simulation-based calibration of a run's amortized guide, per latent coordinate.

Simulates points from the run's model on the arguments of its data (z* ~ p(z), x* ~ p(x | z*)),
ranks z* among the guide's draws of q(z | x*), and tests each coordinate's ranks for uniformity
(chi-square, Holm's correction across coordinates), naming the direction of any miscalibration.
Writes RUN_DIR/calibration-SPLIT-M{simulations}-L{draws}.json and, beside it, the ECDF-difference
plot (-ecdf.png) and the rank histograms (-ranks.png), the worst coordinates first.

With --vsbc, for a guide fitted to one data set (global latents, autoguides): VSBC (Yao et al.
2018), the guide refitted to each simulated data set (dealt to the processes under torchrun);
writes RUN_DIR/vsbc-SPLIT-M{simulations}.json.
"""

from __future__ import annotations

import argparse
import sys

import pyro

from elbogap import calibration, load_run, vsbc
from elbogap.cli.command_line import (
    CommandParser,
    add_common_flags,
    add_trust_flag,
    run_main,
)
from elbogap.foundations.atomic import write_json_atomic
from elbogap.foundations.distributed import Distributed
from elbogap.foundations.errors import check_positive
from elbogap.presentation.figures import save_figure
from elbogap.runs.diagnose import split_points
from elbogap.runs.ownership import own


def parser() -> argparse.ArgumentParser:
    p = CommandParser(description=__doc__)
    p.add_argument("run_dir", help="a directory written by scripts/fit.py")
    p.add_argument("--split", choices=("test", "train", "validation"),
                   help="whose arguments shape the simulated points (default: where the run "
                        "was diagnosed)")
    p.add_argument("--num-simulations", "-M", type=int,
                   help="simulated points (the split's rows are simulated anew as often as "
                        "needed; default 1000), or data sets with --vsbc (default 100)")
    p.add_argument("--num-draws", "-L", type=int, default=99,
                   help="guide draws per simulated point (ranks 0..L)")
    p.add_argument("--bins", type=int, default=20,
                   help="bins of the chi-square test; must divide L + 1")
    p.add_argument("--level", type=float, default=0.05,
                   help="family-wise level of the verdict (Holm's correction)")
    p.add_argument("--panels", type=int, default=12, help="coordinates plotted, worst first")
    v = p.add_argument_group("VSBC: a guide refitted per simulated data set")
    v.add_argument("--vsbc", action="store_true", help="refit the guide to each of -M "
                   "simulated data sets (default -M for it: 100) and test p against 1 - p")
    v.add_argument("--refit-steps", type=int, default=500, help="Adam steps per refit")
    v.add_argument("--lr", type=float, help="Adam learning rate of the refits (default: the "
                   "run's --lr)")
    p.add_argument("--data-plate", help="the plate over data points (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="fixes every simulation and draw")
    p.add_argument("--train-mode", action="store_true", help="keep the pair's modules in "
                   "training mode (Dropout, BatchNorm) instead of evaluation mode")
    add_trust_flag(p)
    add_common_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    check_positive(num_simulations=args.num_simulations, num_draws=args.num_draws,
                   bins=args.bins, panels=args.panels, refit_steps=args.refit_steps)
    args.num_simulations = args.num_simulations or (100 if args.vsbc else 1000)
    ctx = Distributed.from_environment()
    with ctx.session():
        # It writes into the run directory: not while another process (a fit) owns it.
        ctx.on_main(lambda: own(args.run_dir, "scripts/calibrate.py"))
        run = load_run(args.run_dir, trust_code=args.trust_code,
                       trust_model_file=args.trust_model_file)
        pyro.set_rng_seed(args.seed)
        split = args.split or run.split
        x = split_points(run, split, None)
        plate = args.data_plate or run.options.data_plate
        if args.vsbc:
            return refitted(args, run, x, split, plate, ctx)
    if not ctx.is_main:
        return 0
    result = calibration(run.model, run.guide, x, num_simulations=args.num_simulations,
                         num_draws=args.num_draws, bins=args.bins, level=args.level,
                         data_plate=plate, seed=args.seed,
                         train_mode=args.train_mode)
    summary = result.summary()
    stem = f"calibration-{split}-M{args.num_simulations}-L{args.num_draws}"
    out = run.dir / f"{stem}.json"
    write_json_atomic(out, {"data": run.config["data"], "split": split, **summary})
    save_figure(result.ecdf_figure(args.panels), run.dir / f"{stem}-ecdf.png")
    save_figure(result.plot_ranks(args.panels), run.dir / f"{stem}-ranks.png")
    print(f"simulation-based calibration: {summary['num_simulations']} simulated points, "
          f"{summary['num_draws']} guide draws each, {summary['bins']} bins, "
          f"Holm-corrected level {summary['level']}")
    print(f"{'coordinate':<16}{'Holm p':>10}{'spread z':>10}{'shift z':>10}  verdict")
    for name, dims in summary["sites"].items():
        for d in dims:
            print(f"{name + '[' + str(d['dim']) + ']':<16}{d['p_adjusted']:>10.3g}"
                  f"{d['spread_z']:>10.2f}{d['shift_z']:>10.2f}  {d['verdict']}")
    flagged = summary["miscalibrated"]
    print(f"{len(flagged)} miscalibrated" + (f": {', '.join(flagged)}" if flagged else ""))
    print("(spread z > 0: ranks at both ends, q too narrow; < 0: too wide. shift z > 0: the "
          "truth above q's draws, q shifted low)")
    print(f"wrote {out}, {stem}-ecdf.png and {stem}-ranks.png")
    return 0


def refitted(args: argparse.Namespace, run, x, split: str, plate: str,
             ctx: Distributed) -> int:
    """--vsbc: the refits dealt to the processes under torchrun, rank 0 writing."""
    summary = vsbc(run.model, run.guide, x, num_simulations=args.num_simulations,
                   num_steps=args.refit_steps, num_draws=args.num_draws + 1,
                   lr=args.lr or run.options.lr,
                   level=args.level, data_plate=plate, seed=args.seed,
                   progress=not args.no_progress, distributed=ctx).summary()
    if not ctx.is_main:
        return 0
    out = run.dir / f"vsbc-{split}-M{args.num_simulations}.json"
    write_json_atomic(out, {"data": run.config["data"], "split": split, **summary})
    print(f"VSBC: {summary['num_simulations']} refits of {summary['num_steps']} steps "
          f"({summary['seconds_per_refit']:.2f} s each); KS of p against 1 - p, Holm-corrected")
    for name, dims in summary["sites"].items():
        for d in dims:
            print(f"{name + '[' + str(d['dim']) + ']':<24}KS {d['ks_stat']:.3f}  "
                  f"Holm p {d['p_adjusted']:.3g}  {d['verdict']}")
    print(f"wrote {out}")
    return 0


def command(argv: list[str] | None = None) -> int:
    return run_main(main, argv, parser=parser)


if __name__ == "__main__":
    sys.exit(command())
