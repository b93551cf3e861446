"""Fit one Gaussian to a bimodal target by each direction of the KL divergence, side by side.

Reverse KL, D(p_theta || q), seeks one mode; forward KL, D(q || p_theta), covers both (it is
maximum likelihood: the optimum matches the target's mean and variance).  Prints the divergences
of both fits (Monte Carlo with standard error, and by quadrature; closed form when the target is
Gaussian) and the variance of the score-function and pathwise gradient estimators.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyro

from elbogap.cli.command_line import CommandParser, add_common_flags, run_main
from elbogap.diagnostics.kl_directions import fit_both_directions, gradient_variances, make_target
from elbogap.foundations.atomic import write_json_atomic
from elbogap.foundations.errors import ConfigError
from elbogap.presentation.figures import plot_kl_directions, save_figure


def parser() -> argparse.ArgumentParser:
    p = CommandParser(description=__doc__)
    p.add_argument("--target", choices=("bimodal", "gaussian"), default="bimodal",
                   help="bimodal: 1/2 N(-2, 0.5^2) + 1/2 N(2, 0.5^2); gaussian: N(1, 0.7^2)")
    p.add_argument("--separation", type=float, default=2.0,
                   help="the bimodal target's modes sit at -separation and +separation")
    p.add_argument("--estimator", choices=("pathwise", "score-function"), default="pathwise",
                   help="gradient estimator of the reverse-KL fit")
    p.add_argument("--baseline", choices=("none", "leave-one-out"), default="leave-one-out",
                   help="baseline of the score-function estimator")
    p.add_argument("--init-loc", type=float, default=1.0, help="loc of q at the start of each fit")
    p.add_argument("--init-scale", type=float, default=1.0,
                   help="scale of q at the start of each fit")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps per fit")
    p.add_argument("--lr", type=float, default=0.02, help="Adam learning rate")
    p.add_argument("--num-samples", type=int, default=64, help="draws per gradient step")
    p.add_argument("--replicates", type=int, default=2000,
                   help="gradient estimates drawn to measure each estimator's variance")
    p.add_argument("--seed", type=int, default=0, help="fixes every draw")
    p.add_argument("--out", help="directory for kl_directions.png and kl_directions.json")
    add_common_flags(p, progress=False)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for flag in ("steps", "num_samples", "replicates"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be a positive integer")
    if args.num_samples < 2 and args.baseline == "leave-one-out":
        raise ConfigError("--num-samples must be at least 2 for the leave-one-out baseline")
    if not (args.init_scale > 0 and args.lr > 0 and args.separation > 0):
        raise ConfigError("--init-scale, --lr and --separation must be positive")
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--out {out_dir}: cannot create it ({e.strerror})") from None
    pyro.set_rng_seed(args.seed)
    target = make_target(args.target, args.separation)
    gaussian = args.target == "gaussian"
    fits = fit_both_directions(target, args.estimator,
                               None if args.baseline == "none" else args.baseline, args.init_loc,
                               args.init_scale, args.steps, args.lr, args.num_samples)
    variances = gradient_variances(target, args.init_loc, args.init_scale, args.num_samples,
                                   args.replicates)

    mean = target.mean.item()
    std = target.variance.sqrt().item()
    print(f"target: {args.target}; its mean {mean:.4f}, standard deviation {std:.4f}")
    print(f"{'fit':<9}{'loc':>9}{'scale':>9}   {'D(p||q) reverse':>26}   {'D(q||p) forward':>26}")
    for name, fit in fits.items():
        cells = []
        for direction in ("reverse", "forward"):
            d = fit["divergences"][direction]
            exact = d["exact"] if d["exact"] is not None else d["quadrature"]
            cells.append(f"{d['monte_carlo']:.4f} ± {d['monte_carlo_se']:.4f} ({exact:.4f})")
        print(f"{name:<9}{fit['loc']:9.4f}{fit['scale']:9.4f}   {cells[0]:>26}   {cells[1]:>26}")
    print("(Monte Carlo ± SE; in brackets " + ("closed form)" if gaussian else "quadrature)"))
    print(f"\ngradient of D(p||q) at loc={args.init_loc}, scale={args.init_scale}, "
          f"{args.num_samples} draws per estimate, {args.replicates} estimates:")
    for label, params in variances.items():
        text = ", ".join(f"{n}: mean {v['mean']:+.4f} ± {v['se_of_mean']:.4f}, "
                         f"variance {v['variance']:.4f}" for n, v in params.items())
        print(f"  {label:<42} {text}")

    if out_dir is not None:
        title = ("reverse KL seeks a mode, forward KL covers both" if not gaussian
                 else "both directions recover a Gaussian target")
        save_figure(plot_kl_directions(target, fits, title), out_dir / "kl_directions.png")
        write_json_atomic(out_dir / "kl_directions.json", {
            "target": {"name": args.target, "mean": mean, "std": std},
            **{name: {k: v for k, v in fit.items() if k != "family"} for name, fit in fits.items()},
            "gradient_variance": variances,
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "debug")},
        })
        print(f"wrote {out_dir / 'kl_directions.png'} and kl_directions.json")
    return 0


def command(argv: list[str] | None = None) -> int:
    return run_main(main, argv, parser=parser)


if __name__ == "__main__":
    sys.exit(command())
