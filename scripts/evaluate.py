"""Reload a run's checkpoint and re-run the diagnostics, for example with a larger K.

Writes RUN_DIR/evaluation-SPLIT-K{K}.json (diagnostics.json of the run is left as it was).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyro

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    HelpFormatter,
    exact_means,
    format_exact_comparison,
    format_predictive,
    format_summary,
    load_run,
    run_main,
    run_plate,
    run_split,
)

from inference.data.datasets import subset  # noqa: E402
from inference.diagnostics.evaluation import evaluate  # noqa: E402
from inference.diagnostics.predictive import posterior_predictive  # noqa: E402
from inference.errors import ConfigError  # noqa: E402
from inference.outputs.atomic import write_json_atomic  # noqa: E402
from inference.training.distributed import Distributed  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False,
        description=__doc__, formatter_class=HelpFormatter
    )
    p.add_argument("run_dir", help="a directory written by scripts/fit.py")
    p.add_argument("--num-samples", "-K", type=int, help="K (default: the run's --num-samples)")
    p.add_argument("--split", choices=("test", "train"),
                   help="default: where the run was diagnosed (train for a guide with parameters "
                        "per training point, or with global latents)")
    p.add_argument("--max-points", type=int,
                   help="evaluate only this many points (a fixed random subset, seed 0)")
    p.add_argument("--batch-size", type=int, default=100, help="data points per pass")
    p.add_argument("--data-plate", help="the plate over data points (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="fixes the guide's draws")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    for flag, value in (("--num-samples", args.num_samples), ("--batch-size", args.batch_size),
                        ("--max-points", args.max_points)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {value}")
    ctx = Distributed.from_environment()
    try:
        pyro.set_rng_seed(args.seed + ctx.rank)
        config, data, pair, _ = load_run(run_dir)
        k = args.num_samples if args.num_samples is not None else config["num_samples"]
        fitted_on = run_split(config)
        if args.split is None:
            args.split = fitted_on
        x = data.test if args.split == "test" else data.train_epoch()
        x = subset(x, args.max_points)
        plate = run_plate(args, config)
        if args.split == "test" and fitted_on == "train":
            # The guide was fitted to the training set: held-out points get the posterior
            # predictive density, never an evidence gap of data the guide did not see.
            predictive = posterior_predictive(pair.model, pair.guide, x, num_samples=k,
                                              batch_size=args.batch_size, data_plate=plate)
            summary = {"data": config["data"], "split": "test", **predictive.summary()}
            out = run_dir / f"predictive-test-K{k}.json"
            write_json_atomic(out, summary)
            print(format_predictive(summary))
            print(f"wrote {out}")
            return 0
        diagnostics = evaluate(pair.model, pair.guide, x, num_samples=k,
                               batch_size=args.batch_size, data_plate=plate,
                               progress=not args.no_progress and ctx.is_main, distributed=ctx)
    finally:
        ctx.shutdown()
    if not ctx.is_main:
        return 0
    summary = {"data": config["data"], "split": args.split, **diagnostics.summary()}
    exact = pair.exact(x)
    if exact is not None:
        summary["exact"] = exact_means(exact)
    out = run_dir / f"evaluation-{args.split}-K{k}.json"
    write_json_atomic(out, summary)
    print(format_summary(summary))
    if exact is not None:
        print(format_exact_comparison(diagnostics, exact))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
