"""Write RUN_DIR/report.html: every diagnostic of a run in one self-contained page.

Also writes RUN_DIR/inference_data.nc (guide samples of a few test points, for ArviZ) and
RUN_DIR/report.json (the numbers in the report).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    EXACT_ROWS,
    HelpFormatter,
    exact_means,
    load_run,
    run_figures,
    run_main,
    run_plate,
    run_split,
)

from inference.data.datasets import subset  # noqa: E402
from inference.diagnostics.amortization import decompose_gap, fit_local_guide, normal_sites  # noqa: E402
from inference.diagnostics.evaluation import ACTIVE_UNIT_THRESHOLD, evaluate  # noqa: E402
from inference.diagnostics.local_guide import LocalMeanFieldGuide, LocalSite  # noqa: E402
from inference.diagnostics.predictive import posterior_predictive  # noqa: E402
from inference.errors import ConfigError, ConventionError  # noqa: E402
from inference.outputs.arviz_export import guide_inference_data, save_inference_data  # noqa: E402
from inference.outputs.atomic import write_json_atomic, write_text_atomic  # noqa: E402
from inference.outputs.html import FigureItem, Note, Table, render_html  # noqa: E402
from inference.outputs.plotting import (  # noqa: E402
    figure_png,
    plot_active_units,
    plot_gap_decomposition,
    plot_khat_histogram,
    plot_latent_scatter,
)
from inference.training.fitting import METRICS, diagnosed_points  # noqa: E402

CAPTIONS = {
    "elbo.png": ("ELBO during training", "Train and test ELBO per data point, in nats."),
    "reconstruction_kl.png": (
        "Reconstruction and KL during training",
        "The ELBO's two terms on held-out points, with ± 2 standard errors over points.",
    ),
    "evidence_gap.png": (
        "Evidence and evidence gap during training",
        "Importance-sampled log p(x) and the ELBO (top); their difference, which estimates "
        "KL(q(z|x) || p(z|x)), with its Monte Carlo band (bottom).",
    ),
    "kl_per_dim.png": (
        "KL to the prior per latent dimension",
        "Mean over test points of KL(q(z_d|x) || p(z_d)); dimensions near 0 nats are unused.",
    ),
    "reconstructions.png": (
        "Reconstructions",
        "Inputs and E[x|z] with z ~ q(z|x), read off the model's observed site.",
    ),
    "prior_samples.png": ("Samples from the prior", "E[x|z] with z ~ p(z)."),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False,
        description=__doc__, formatter_class=HelpFormatter
    )
    p.add_argument("run_dir", help="a directory written by scripts/fit.py")
    p.add_argument("--num-samples", "-K", type=int, default=1000, help="importance samples")
    p.add_argument("--max-points", type=int, default=500,
                   help="test points diagnosed (a fixed random subset, seed 0; the smaller "
                        "subsets below are subsets of it)")
    p.add_argument("--amortization-points", type=int, default=50,
                   help="test points for the amortization gap (0: skip it)")
    p.add_argument("--amortization-steps", type=int, default=500,
                   help="SVI steps fitting the local guide q*")
    p.add_argument("--idata-points", type=int, default=5,
                   help="test points whose guide samples go to inference_data.nc")
    p.add_argument("--idata-draws", type=int, default=1000,
                   help="guide draws per point in inference_data.nc")
    p.add_argument("--data-plate", help="the plate over data points (default: the run's)")
    p.add_argument("--seed", type=int, default=0,
                   help="fixes every draw (the report's numbers are a fresh estimate)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return p


def fmt(entry: dict | None) -> tuple[str, str]:
    if entry is None or entry.get("mean") is None:
        return ("", "")
    se = entry.get("se")
    return (f"{entry['mean']:.3f}", f"{se:.3f}" if se is not None else "")


def read_history(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latent_projection(latent_mean: dict[str, torch.Tensor]) -> tuple[np.ndarray, tuple[str, str]]:
    """E_q[z|x] in 2-D: as is for a 2-D latent space, else its first two principal components."""
    means = torch.cat([m.double() for m in latent_mean.values()], dim=1)
    if means.shape[1] == 1:
        means = torch.cat([means, torch.zeros_like(means)], dim=1)
        return means.numpy(), ("E_q[z]", "(1-D latent)")
    if means.shape[1] == 2:
        return means.numpy(), ("E_q[z_1]", "E_q[z_2]")
    centred = means - means.mean(0)
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    share = (s**2 / (s**2).sum())[:2]
    labels = tuple(f"principal component {i + 1} of E_q[z] ({100 * share[i]:.0f} % of variance)"
                   for i in range(2))
    return (centred @ v[:2].T).numpy(), labels


def caption(name: str, history: list[dict]) -> tuple[str, str]:
    """A figure's title and caption; the dashed closed-form lines are mentioned only where the
    figure has them."""
    title, text = CAPTIONS[name]
    if name == "evidence_gap.png" and any("exact" in r for r in history):
        text += " Dashed: the closed forms of the model."
    return title, text


def write_report(run_dir: Path, report: dict, notes, tables, figures, subtitle: str) -> None:
    page = render_html("elbogap report", subtitle, notes, tables, figures)
    write_text_atomic(run_dir / "report.html", page)
    write_json_atomic(run_dir / "report.json", report)


def write_data_set_report(run_dir: Path, config: dict, data, pair, d, args) -> int:
    """The report of a pair whose unit is the data set (global latents): totals, the joint
    weights' k-hat, the held-out points' predictive density, and the training curves."""
    summary = d.summary()
    t = summary["total"]
    report = {"data": config["data"], "split": "train", **summary}
    notes = [Note(f"The numbers below are a fresh estimate (K={args.num_samples}, seed "
                  f"{args.seed}), not those of the run's diagnostics.json: they differ from them "
                  "within their Monte Carlo standard errors.")] + [Note(n) for n in d.notes]
    if "khat" in summary:
        notes.append(Note(f"Pareto k-hat: {summary['khat']['verdict']}.",
                          warning=summary["khat"]["share_unreliable"] > 0))

    def total(key):
        se = t.get(f"{key}_se")
        return (f"{t[key]:.3f}", f"{se:.3f}" if se is not None else "")

    rows = [("ELBO(x_1..N)", *total("elbo")), ("reconstruction", *total("reconstruction")),
            ("KL(q || p), all latent variables", *total("kl_prior"))]
    rows += [(f"  site '{name}' ({e['method']})", f"{e['mean']:.3f}", "")
             for name, e in summary["kl_sites"].items()]
    rows += [(f"log p(x_1..N), importance sampling K={args.num_samples}", *total("log_evidence")),
             ("evidence gap log p(x_1..N) - ELBO", *total("evidence_gap"))]
    tables = [Table(f"Summary for the data set the guide was fitted to ({d.num_data} training "
                    "points; nats, totals)", ("quantity", "total", "± Monte Carlo SE"), rows)]
    if data.test.shape[0]:
        p = posterior_predictive(pair.model, pair.guide, subset(data.test, args.max_points),
                                 num_samples=args.num_samples, batch_size=100,
                                 data_plate=run_plate(args, config))
        report["held_out_predictive"] = ps = p.summary()
        tables.append(Table(f"Held-out points ({ps['num_data']} test points): {ps['name']}",
                            ("quantity", "mean per point", "± SE over points"),
                            [("log p_q(x)", *fmt(ps["log_density"]))]))
    history = read_history(run_dir)
    figures = [
        FigureItem(*caption(name, history), figure_png(fig))
        for name, fig in run_figures(history, summary["kl_per_dim"], pair, data,
                                     held_out=False).items()
    ]
    write_report(run_dir, report, notes, tables, figures,
                 f"run {run_dir} · data {config['data']} · model {config['model']} · guide "
                 f"{config['guide']} · K={args.num_samples} · unit: the data set "
                 f"(N={d.num_data} training points)")
    print(f"wrote {run_dir / 'report.html'}, report.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for flag in ("num_samples", "max_points", "idata_points", "idata_draws",
                 "amortization_steps"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be a positive integer")
    if args.amortization_points < 0:
        raise ConfigError("--amortization-points must be 0 or more")
    run_dir = Path(args.run_dir)
    pyro.set_rng_seed(args.seed)
    config, data, pair, _ = load_run(run_dir)
    split = run_split(config)
    held_out = split == "test"
    x = diagnosed_points(data, split, args.max_points)
    progress = not args.no_progress
    d = evaluate(pair.model, pair.guide, x, num_samples=args.num_samples, batch_size=100,
                 data_plate=run_plate(args, config), progress=progress)
    if d.unit != "data point":
        return write_data_set_report(run_dir, config, data, pair, d, args)
    summary = d.summary()
    report = {"data": config["data"], "split": split, **summary}

    notes = [Note(
        f"The numbers below are a fresh estimate (K={args.num_samples}, seed {args.seed}, "
        f"{d.num_data} {split} points), not those of the run's diagnostics.json: they differ "
        "from them within their Monte Carlo standard errors."
    )]
    if "khat" in summary:
        notes.append(Note(f"Pareto k-hat: {summary['khat']['verdict']}.",
                          warning=summary["khat"]["share_unreliable"] > 0))
    units = summary["active_units"]
    notes.append(Note(
        units["warning"] or f"{units['active']} of {units['total']} latent dimensions are active.",
        warning=units["warning"] is not None,
    ))
    rows = [
        ("ELBO", *fmt(summary["elbo"])),
        ("reconstruction E_q[log p(x|z)]", *fmt(summary["reconstruction"])),
        ("KL(q(z|x) || p(z))", *fmt(summary["kl_prior"])),
        (f"log p(x), importance sampling K={args.num_samples}", *fmt(summary["log_evidence"])),
        ("evidence gap log p(x) - ELBO", *fmt(summary["evidence_gap"])),
    ]
    tables = [Table(f"Summary on {d.num_data} {split} points (nats per data point)",
                    ("quantity", "mean", "± SE over points"), rows)]
    exact = pair.exact(x)
    if exact is not None:
        report["exact"] = exact_means(exact)
        tables.append(Table(
            "Closed forms (the model has them)", ("quantity", "estimated", "exact"),
            [(name, f"{summary[name]['mean']:.4f}", f"{report['exact'][name]:.4f}")
             for name in EXACT_ROWS],
        ))

    history = read_history(run_dir)
    figures = [
        FigureItem(*caption(name, history), figure_png(fig))
        for name, fig in run_figures(history, summary["kl_per_dim"], pair, data,
                                     held_out).items()
    ]
    figures.append(FigureItem(
        "Reliability of the evidence estimate",
        "Pareto k-hat of each test point's importance weights: below 0.5 the estimate of log p(x) "
        "is reliable, above 0.7 it is not (Yao et al. 2018).",
        figure_png(plot_khat_histogram(d.khat.numpy())),
    ))
    variances = {name: site["variance"] for name, site in units["sites"].items()}
    figures.append(FigureItem(
        "Active units",
        "Variance over test points of each latent dimension's posterior mean (Burda et al. 2016); "
        "below 0.01 a dimension carries no information about x.",
        figure_png(plot_active_units(variances, ACTIVE_UNIT_THRESHOLD)),
    ))
    projected, axis_labels = latent_projection(d.latent_mean)
    figures.append(FigureItem(
        "Latent space", "Posterior means of the test points, coloured by their evidence gap.",
        figure_png(plot_latent_scatter(projected, d.evidence_gap.numpy(), "evidence gap (nats)",
                                       axis_labels)),
    ))

    if not held_out:
        notes.append(Note("No amortization gap: the guide has parameters per training point "
                          "(it is not amortized), so it is already the local guide q*."))
    if args.amortization_points and held_out:
        xa = subset(data.test, args.amortization_points)
        try:
            sites = {n: LocalSite(**s) for n, s in normal_sites(pair.model, pair.guide, xa).items()}
        except ConventionError as e:
            notes.append(Note(f"Amortization gap not computed: {e}", warning=True))
        else:
            local = LocalMeanFieldGuide(sites)
            start = time.perf_counter()
            fit_local_guide(pair.model, local.guide, local.parameters(), xa,
                            steps=args.amortization_steps)
            gaps = decompose_gap(pair.model, pair.guide, local.guide, xa,
                                 num_samples=args.num_samples)
            report["gap_decomposition"] = {
                **gaps.summary(), "steps": args.amortization_steps,
                "seconds": time.perf_counter() - start,
            }
            g = report["gap_decomposition"]
            tables.append(Table(
                f"Where the gap comes from ({g['num_data']} test points, local guide q* fitted "
                f"with {args.amortization_steps} SVI steps)",
                ("quantity", "mean", "± SE over points"),
                [("log p(x) (q* as proposal)", *fmt(g["log_evidence"])),
                 ("ELBO of the encoder", *fmt(g["elbo_amortized"])),
                 ("ELBO of q*", *fmt(g["elbo_local"])),
                 ("approximation gap log p(x) - ELBO[q*]", *fmt(g["approximation_gap"])),
                 ("amortization gap ELBO[q*] - ELBO[encoder]", *fmt(g["amortization_gap"]))],
            ))
            figures.append(FigureItem(
                "Gap decomposition",
                "Approximation gap: what the mean-field family cannot capture. Amortization "
                "gap: what sharing one encoder across data points costs (Cremer et al. 2018).",
                figure_png(plot_gap_decomposition(gaps.approximation_gap.numpy(),
                                                  gaps.amortization_gap.numpy())),
            ))

    if held_out:
        idata = guide_inference_data(pair.model, pair.guide, subset(data.test, args.idata_points),
                                     args.idata_draws)
        save_inference_data(idata, run_dir / "inference_data.nc")
    subtitle = (f"run {run_dir} · data {config['data']} · model {config['model']} · guide "
                f"{config['guide']} · K={args.num_samples} · N={d.num_data} {split} points")
    write_report(run_dir, report, notes, tables, figures, subtitle)
    print(f"wrote {run_dir / 'report.html'}, report.json" + (
        f", inference_data.nc (guide draws for {args.idata_points} test points: "
        "arviz.from_netcdf)" if held_out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
