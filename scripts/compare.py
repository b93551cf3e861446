"""Put runs side by side: DIR/compare.html (one table, paired differences against the first
run where the runs share test points, the training curves overlaid) and DIR/compare.json."""

from __future__ import annotations

import argparse
import sys

from elbogap import compare
from elbogap.cli.command_line import CommandParser, add_common_flags, add_trust_flag, run_main
from elbogap.foundations.errors import ConfigError, check_positive
from elbogap.runs.compare import writable_directory


def parser() -> argparse.ArgumentParser:
    p = CommandParser(description=__doc__)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="directories of scripts/fit.py")
    p.add_argument("--out", default="runs/compare", help="directory for compare.html and .json")
    p.add_argument("--num-samples", "-K", type=int, default=1000, help="importance samples")
    p.add_argument("--points", type=int, default=500,
                   help="test points, the same fixed random subset (seed 0) for every run")
    p.add_argument("--surgery", action="store_true", help="add ELBO surgery's mutual information")
    p.add_argument("--amortization-points", type=int, default=0,
                   help="split each run's gap into approximation and amortization gaps on this "
                        "many of the points (q*, the guide's own family fitted per point, or "
                        "the guide fine-tuned on each point: the notes say which; 0: skip)")
    p.add_argument("--amortization-steps", type=int, default=500,
                   help="SVI steps fitting q* per point for --amortization-points")
    p.add_argument("--seed", type=int, default=0, help="the same draws' seed for every run")
    add_trust_flag(p)
    add_common_flags(p, progress=False)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    check_positive(num_samples=args.num_samples, points=args.points,
                   amortization_steps=args.amortization_steps)
    if args.amortization_points < 0:
        raise ConfigError(f"--amortization-points must be 0 or more, got {args.amortization_points}")
    writable_directory(args.out)  # before the runs are evaluated, not after
    comparison = compare(args.run_dirs, num_samples=args.num_samples, points=args.points,
                         seed=args.seed, surgery=args.surgery,
                         amortization_points=args.amortization_points,
                         amortization_steps=args.amortization_steps,
                         trust_code=args.trust_code,
                         trust_model_file=args.trust_model_file)
    table = comparison.table()
    width = max(len(row[0]) for row in table.rows)
    print(f"{'':<{width}}  " + "  ".join(f"{n:>18}" for n in comparison.names))
    for row in table.rows:
        print(f"{row[0]:<{width}}  " + "  ".join(f"{c:>18}" for c in row[1:]))
    for note in comparison.notes:
        print(f"note: {note}")
    written = comparison.write(args.out)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def command(argv: list[str] | None = None) -> int:
    return run_main(main, argv, parser=parser)


if __name__ == "__main__":
    sys.exit(command())
