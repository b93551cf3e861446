"""Train a model/guide pair with SVI and report its ELBO, KL, evidence and evidence gap.

With no arguments: the VAE on scikit-learn's bundled 8x8 digits (no download).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import pyro

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import build_pair, format_summary, parse_hidden_dims, run_main  # noqa: E402

from inference.atomic import write_json_atomic  # noqa: E402
from inference.datasets import BINARIZATIONS, load_dataset  # noqa: E402
from inference.diagnostics import evaluate  # noqa: E402
from inference.errors import ConfigError  # noqa: E402
from inference.plotting import (  # noqa: E402
    plot_elbo_curves,
    plot_evidence_gap,
    plot_image_grid,
    plot_kl_per_dim,
    plot_reconstructions,
    plot_terms_curves,
)
from inference.reconstruction import reconstruct, sample_prior_means  # noqa: E402
from inference.training import FitOptions, fit  # noqa: E402

DATASETS = ("digits", "mnist", "binarized_mnist", "frey_face")


def parser() -> argparse.ArgumentParser:
    defaults = FitOptions()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    data = p.add_argument_group("data")
    data.add_argument("--data", choices=DATASETS, default="digits",
                      help="data set; all but digits are read from --data-dir")
    data.add_argument("--data-dir", help="directory (or .mat file for frey_face) to read from")
    data.add_argument("--binarize", choices=BINARIZATIONS, default="dynamic",
                      help="how --data mnist is binarized")
    pair = p.add_argument_group("model and guide")
    pair.add_argument("--model", default="vae",
                      help="a registered model (vae) or path/to/file.py:name returning "
                           "(model, guide)")
    pair.add_argument("--guide", default="mean-field", help="a registered guide")
    pair.add_argument("--likelihood", choices=("auto", "bernoulli", "gaussian"), default="auto",
                      help="observation model; auto: bernoulli for binary data, else gaussian")
    pair.add_argument("--latent-dim", type=int,
                      help="latent dimensions (default: 50, or 10 for data of < 400 pixels)")
    pair.add_argument("--hidden-dims",
                      help="comma-separated hidden layer sizes, '' for none "
                           "(default: 400, or 200 for data of < 400 pixels)")
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=defaults.epochs)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate")
    train.add_argument("--num-particles", type=int, default=defaults.num_particles,
                       help="ELBO samples per step")
    train.add_argument("--elbo", choices=("trace", "meanfield"), default=defaults.elbo,
                       help="Trace_ELBO or TraceMeanField_ELBO (analytic KL in the loss)")
    train.add_argument("--seed", type=int, default=0, help="fixes every random number on CPU")
    ev = p.add_argument_group("diagnostics")
    ev.add_argument("--num-samples", "-K", type=int, default=1000,
                    help="K, importance samples per test point in the final evaluation")
    ev.add_argument("--eval-every", type=int, default=defaults.eval_every,
                    help="epochs between diagnostics during training")
    ev.add_argument("--eval-samples", type=int, default=defaults.eval_samples,
                    help="K for the diagnostics during training")
    ev.add_argument("--eval-points", type=int, default=defaults.eval_points,
                    help="test points diagnosed during training")
    ev.add_argument("--eval-batch-size", type=int, default=100,
                    help="test points per pass in the final evaluation")
    out = p.add_argument_group("output")
    out.add_argument("--out", help="run directory (default: runs/DATA-MODEL-TIME)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
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
        "guide": args.guide,
        "likelihood": likelihood,
        "latent_dim": args.latent_dim if args.latent_dim is not None else (10 if small else 50),
        "hidden_dims": list(parse_hidden_dims(hidden)),
        "seed": args.seed,
        "num_samples": args.num_samples,
        "eval_batch_size": args.eval_batch_size,
    }
    for f in fields(FitOptions):
        if hasattr(args, f.name):
            config[f.name] = getattr(args, f.name)
    return config


def prepare_run_dir(args: argparse.Namespace) -> Path:
    if args.out:
        run_dir = Path(args.out)
    else:
        run_dir = Path("runs") / f"{args.data}-{Path(args.model).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir.exists() and any(run_dir.iterdir()) and not args.overwrite:
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


def write_plots(run_dir: Path, history: list[dict], summary: dict, model, guide, data) -> None:
    plot_elbo_curves(history, run_dir / "elbo.png")
    plot_terms_curves(history, run_dir / "reconstruction_kl.png")
    plot_evidence_gap(history, run_dir / "evidence_gap.png")
    plot_kl_per_dim(summary["kl_per_dim"], run_dir / "kl_per_dim.png")
    x = data.test[:32]
    plot_reconstructions(x.numpy(), reconstruct(model, guide, x).numpy(), data.image_shape,
                         run_dir / "reconstructions.png")
    plot_image_grid(sample_prior_means(model, data.test[:64]).numpy(), data.image_shape,
                    run_dir / "prior_samples.png", "prior samples: E[x|z], z ~ p(z)")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be a positive integer, got {args.num_samples}")
    if args.eval_batch_size < 1:
        raise ConfigError(f"--eval-batch-size must be a positive integer, got {args.eval_batch_size}")
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    data = load_dataset(args.data, args.data_dir, args.binarize)
    config = make_config(args, data)
    model, guide = build_pair(config, data)
    options = FitOptions(**{f.name: config[f.name] for f in fields(FitOptions)
                            if f.name in config})
    options.progress = not args.no_progress
    options.check(data.train.shape[0])
    run_dir = prepare_run_dir(args)
    write_json_atomic(run_dir / "config.json", {**config, "fit_options": asdict(options)})
    print(f"run directory: {run_dir}")

    result = fit(model, guide, data, options, run_dir)
    diagnostics = evaluate(model, guide, data.test, num_samples=args.num_samples,
                           batch_size=args.eval_batch_size, progress=options.progress)
    summary = {"data": args.data, "split": "test", **diagnostics.summary()}
    write_json_atomic(run_dir / "diagnostics.json", summary)
    write_plots(run_dir, result.history, summary, model, guide, data)
    print(format_summary(summary))
    print(f"wrote {run_dir}/: config.json metrics.jsonl checkpoint.pt diagnostics.json *.png")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
