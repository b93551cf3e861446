"""Fit one Gaussian to a bimodal target by each direction of the KL divergence, side by side.

Reverse KL, D(p_theta || q), seeks one mode; forward KL, D(q || p_theta), covers both (it is
maximum likelihood: the optimum matches the target's mean and variance).  Prints the divergences
of both fits (Monte Carlo with standard error, and by quadrature; closed form when the target is
Gaussian) and the variance of the score-function and pathwise gradient estimators.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import HelpFormatter, run_main  # noqa: E402

from inference.diagnostics.kl_directions import (  # noqa: E402
    DiagonalGaussian,
    fit_kl,
    gradient_samples,
    kl_monte_carlo,
    kl_quadrature,
    parameter_names,
    surrogate_loss,
)
from inference.errors import ConfigError  # noqa: E402
from inference.outputs.atomic import write_json_atomic  # noqa: E402
from inference.outputs.plotting import save_figure  # noqa: E402

DIVERGENCE = {"reverse": "min D(p_θ || q)", "forward": "min D(q || p_θ)"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False,
        description=__doc__, formatter_class=HelpFormatter
    )
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
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return p


def make_target(name: str, separation: float) -> dist.Distribution:
    if name == "gaussian":
        return dist.Normal(torch.tensor([1.0]), torch.tensor([0.7])).to_event(1)
    locs = torch.tensor([[-separation], [separation]])
    return dist.MixtureSameFamily(
        dist.Categorical(probs=torch.tensor([0.5, 0.5])), dist.Normal(locs, 0.5).to_event(1)
    )


def divergences(p: dist.Distribution, target: dist.Distribution, gaussian: bool) -> dict:
    """Both directions: Monte Carlo (mean, se), quadrature, and closed form where one exists."""
    out = {}
    for name, (a, b) in {"reverse": (p, target), "forward": (target, p)}.items():
        mc = kl_monte_carlo(a, b, 200_000)
        entry = {"monte_carlo": mc.mean, "monte_carlo_se": mc.se,
                 "quadrature": kl_quadrature(a, b, -15.0, 15.0)}
        entry["exact"] = (torch.distributions.kl_divergence(a, b).item() if gaussian else None)
        out[name] = entry
    return out


def gradient_variances(target, args) -> dict:
    """Mean and variance of each estimator of grad D(p_theta || q) at the initial theta."""
    out = {}
    for label, estimator, baseline in (
        ("score-function", "score-function", None),
        ("score-function + leave-one-out baseline", "score-function", "leave-one-out"),
        ("pathwise", "pathwise", None),
    ):
        family = DiagonalGaussian(torch.tensor([args.init_loc]), torch.tensor([args.init_scale]))
        grads = gradient_samples(family, surrogate_loss("reverse", estimator, baseline), target,
                                 args.num_samples, args.replicates)
        out[label] = {
            name: {"mean": grads[:, i].mean().item(), "variance": grads[:, i].var().item(),
                   "se_of_mean": grads[:, i].std().item() / math.sqrt(args.replicates)}
            for i, name in enumerate(parameter_names(family))
        }
    return out


def plot(target, fits: dict, title: str):
    x = torch.linspace(-6, 6, 1201).unsqueeze(-1)
    fig, ax = plt.subplots(figsize=(7, 4))
    with torch.no_grad():
        ax.fill_between(x[:, 0], target.log_prob(x).exp(), color="0.85", label="target q")
        for (name, fit), color in zip(fits.items(), ("C3", "C0"), strict=True):
            density = fit["family"].distribution().log_prob(x).exp()
            ax.plot(x[:, 0], density, color=color, lw=2,
                    label=f"{name} KL, {DIVERGENCE[name]}: loc {fit['loc']:.2f}, "
                          f"scale {fit['scale']:.2f}")
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


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
    baseline = None if args.baseline == "none" else args.baseline
    fits = {}
    for direction, estimator in (("reverse", args.estimator), ("forward", "pathwise")):
        family = DiagonalGaussian(torch.tensor([args.init_loc]), torch.tensor([args.init_scale]))
        fit_kl(family, target, direction, estimator=estimator, baseline=baseline,
               steps=args.steps, lr=args.lr, num_samples=args.num_samples)
        fits[direction] = {
            "family": family,
            "estimator": estimator if direction == "reverse" else "maximum likelihood",
            "loc": family.loc.item(),
            "scale": family.log_scale.exp().item(),
        }
    with torch.no_grad():
        for fit in fits.values():
            fit["divergences"] = divergences(fit["family"].distribution(), target, gaussian)
    variances = gradient_variances(target, args)

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
        save_figure(plot(target, fits, title), out_dir / "kl_directions.png")
        write_json_atomic(out_dir / "kl_directions.json", {
            "target": {"name": args.target, "mean": mean, "std": std},
            **{name: {k: v for k, v in fit.items() if k != "family"} for name, fit in fits.items()},
            "gradient_variance": variances,
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "debug")},
        })
        print(f"wrote {out_dir / 'kl_directions.png'} and kl_directions.json")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
