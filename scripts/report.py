"""Write RUN_DIR/report.html: every diagnostic of a run in one self-contained page.

Also writes RUN_DIR/inference_data.nc (guide samples of a few test points, for ArviZ) and
RUN_DIR/report.json (the numbers in the report).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from elbogap import Report, ReportSettings, load_run, move_pair, resolve_device
from elbogap.cli.command_line import (
    CommandParser,
    add_common_flags,
    add_device_flag,
    add_trust_flag,
    run_main,
)
from elbogap.foundations.distributed import Distributed
from elbogap.runs.ownership import own


def parser() -> argparse.ArgumentParser:
    s = ReportSettings()
    p = CommandParser(description=__doc__)
    p.add_argument("run_dir", help="a directory written by scripts/fit.py")
    p.add_argument("--num-samples", "-K", type=int, default=s.num_samples,
                   help="importance samples")
    p.add_argument("--max-points", type=int, default=s.max_points,
                   help="test points diagnosed (a fixed random subset, seed 0; the smaller "
                        "subsets below are subsets of it)")
    p.add_argument("--amortization-points", type=int, default=s.amortization_points,
                   help="test points for the amortization gap (0: skip it)")
    p.add_argument("--amortization-steps", type=int, default=s.amortization_steps,
                   help="SVI steps fitting the local guide q*")
    p.add_argument("--idata-points", type=int, default=s.idata_points,
                   help="test points whose guide samples go to inference_data.nc")
    p.add_argument("--idata-draws", type=int, default=s.idata_draws,
                   help="guide draws per point in inference_data.nc")
    p.add_argument("--ais-points", type=int, default=s.ais_points,
                   help="test points for annealed importance sampling beside IS (0: skip it)")
    p.add_argument("--ais-steps", type=int, default=s.ais_steps, help="AIS distributions T")
    p.add_argument("--ais-chains", type=int, default=s.ais_chains, help="AIS chains per point")
    p.add_argument("--no-bdmc", dest="bdmc", action="store_false",
                   help="skip the BDMC bracket on --ais-points simulated points")
    p.add_argument("--calibration-simulations", type=int, default=s.calibration_simulations,
                   help="points simulated for the guide's calibration (0: skip it; else 100 "
                        "or more)")
    p.add_argument("--time-budget", type=float, default=s.time_budget, help="seconds after "
                   "which sections not yet begun are left out, each said so (0: no limit)")
    p.add_argument("--data-plate", help="the plate over data points (default: the run's)")
    p.add_argument("--seed", type=int, default=s.seed,
                   help="fixes every draw (the report's numbers are a fresh estimate)")
    add_device_flag(p)
    add_trust_flag(p)
    add_common_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = ReportSettings(**{f.name: getattr(args, f.name) for f in fields(ReportSettings)
                                 if hasattr(args, f.name)}, progress=not args.no_progress)
    settings.check()
    # Under torchrun every rank builds the report, sharing the points of each estimator out;
    # rank 0 writes it.
    ctx = Distributed.from_environment(args.device)
    with ctx.session():
        # It writes into the run directory: not while another process (a fit) owns it.
        ctx.on_main(lambda: own(args.run_dir, "scripts/report.py"))
        run = load_run(args.run_dir, trust_code=args.trust_code,
                       trust_model_file=args.trust_model_file)
        move_pair(run.model, run.guide, resolve_device(args.device))
        report = Report.build(run, settings, distributed=ctx)
        written = ctx.on_main(report.write)
    if not ctx.is_main:
        return 0
    print("wrote " + ", ".join(str(p) for p in written) + (
        f" (inference_data.nc: guide draws for {settings.idata_points} test points, "
        "arviz.from_netcdf)" if report.idata is not None else ""))
    return 0


def command(argv: list[str] | None = None) -> int:
    return run_main(main, argv, parser=parser)


if __name__ == "__main__":
    sys.exit(command())
