"""A run's report: every diagnostic in one self-contained HTML page (and its numbers in JSON,
the guide's draws of a few points for ArviZ).  ``Report.build(load_run(dir))`` makes it from
Python; in a notebook it shows itself, and ``write()`` saves it into the run directory."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch

from ..data.dataset import subset
from ..diagnostics.ais import ais_beside_importance
from ..diagnostics.amortization import split_gap
from ..diagnostics.bdmc import bdmc
from ..diagnostics.calibration import calibration
from ..diagnostics.guide_draws import guide_inference_data
from ..diagnostics.results import ACTIVE_UNIT_THRESHOLD, DATA_POINT, Diagnostics
from ..diagnostics.surgery import elbo_surgery
from ..foundations.atomic import write_json_atomic, write_text_atomic
from ..foundations.distributed import SINGLE, Distributed
from ..foundations.errors import ConventionError, OptionError, check_positive
from ..foundations.module_mode import evaluation_mode
from ..foundations.statistics import mean_and_se
from ..foundations.wording import counted
from ..presentation.figures import (
    figure_png,
    plot_active_units,
    plot_ais_vs_importance,
    plot_gap_decomposition,
    plot_khat_histogram,
    plot_latent_scatter,
)
from ..presentation.html import FigureItem, Note, Table, render_html
from ..presentation.inference_data import save_inference_data
from ..presentation.table import bracket_reading, labels, monte_carlo_kl_notes
from .diagnose import diagnose, held_out_summary, run_figures
from .pairs import EXACT_ROWS, exact_means
from .run_directory import Run

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


@dataclass
class ReportSettings:
    """How much work the report does; every field is a flag of ``scripts/report.py``."""

    num_samples: int = 1000
    max_points: int = 500
    amortization_points: int = 50
    amortization_steps: int = 500
    idata_points: int = 5
    idata_draws: int = 1000
    ais_points: int = 20  # 0: no AIS
    ais_steps: int = 200
    ais_chains: int = 16
    bdmc: bool = True  # bracket AIS on ais_points points simulated from the model
    calibration_simulations: int = 1000  # simulation-based calibration of the guide; 0: none
    # Seconds after which the sections not yet begun (calibration, AIS and BDMC, the gap's
    # split, guide draws) are left out, each with a note saying so; 0: no limit.
    time_budget: float = 600.0
    data_plate: str | None = None  # None: the run's
    seed: int = 0
    progress: bool = True

    def check(self) -> None:
        check_positive(**{name: getattr(self, name) for name in (
            "num_samples", "max_points", "idata_points", "idata_draws", "amortization_steps",
            "ais_steps", "ais_chains")})
        for name in ("amortization_points", "ais_points", "calibration_simulations"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise OptionError(name, f"must be 0 or more, got {value}")
        if not (isinstance(self.time_budget, float | int) and self.time_budget >= 0):
            raise OptionError("time_budget", f"must be 0 (no limit) or a positive number of "
                                             f"seconds, got {self.time_budget}")
        if 0 < self.calibration_simulations < 100:
            raise OptionError("calibration_simulations", "must be 0 (none) or at least 100 (5 "
                              f"per bin of the 20-bin test), got {self.calibration_simulations}")


def _fmt(entry: dict | None) -> tuple[str, str]:
    if entry is None or entry.get("mean") is None:
        return ("", "")
    se = entry.get("se")
    return (f"{entry['mean']:.3f}", f"{se:.3f}" if se is not None else "")


def latent_projection(latent_mean: dict[str, torch.Tensor]) -> tuple[np.ndarray, tuple[str, str]]:
    """E_q[z|x] in 2-D: as is for a 2-D latent space, else its first two principal components;
    a 1-D latent space stays one column (its figure puts the coloured value on the other axis)."""
    means = torch.cat([m.double() for m in latent_mean.values()], dim=1)
    if means.shape[1] == 1:
        return means.numpy(), ("E_q[z]", "")
    if means.shape[1] == 2:
        return means.numpy(), ("E_q[z_1]", "E_q[z_2]")
    centred = means - means.mean(0)
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    share = (s**2 / (s**2).sum())[:2]
    axes = tuple(f"principal component {i + 1} of E_q[z] ({100 * share[i]:.0f} % of variance)"
                 for i in range(2))
    return (centred @ v[:2].T).numpy(), axes


def caption(name: str, history: list[dict]) -> tuple[str, str]:
    """A figure's title and caption; the dashed closed-form lines are mentioned only where the
    figure has them."""
    title, text = CAPTIONS[name]
    if name == "evidence_gap.png" and any("exact" in r for r in history):
        text += " Dashed: the closed forms of the model."
    return title, text


@dataclass
class Report:
    """The report of a run: its numbers (``numbers``, written as report.json), notes, tables and
    figures; ``idata`` holds guide draws of a few test points (an ArviZ InferenceData)."""

    run: Run
    settings: ReportSettings
    diagnostics: Diagnostics
    numbers: dict
    notes: list[Note] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[FigureItem] = field(default_factory=list)
    idata: object = None
    distributed: Distributed = SINGLE

    @classmethod
    def build(cls, run: Run, settings: ReportSettings | None = None, *,
              distributed: Distributed = SINGLE, **kwargs) -> Report:
        """Diagnose ``run`` afresh (``ReportSettings``' fields may be passed as keywords), with
        the pair's modules in evaluation mode throughout (its fitting of q* too).  Under
        torchrun (``distributed``) every rank builds the report, each estimator sharing the
        points out; AIS, BDMC and the gap's split are keyed by the seed, the same for any
        number of ranks."""
        settings = settings or ReportSettings(**kwargs)
        settings.check()
        with evaluation_mode(run.model, run.guide):
            return cls._build(run, settings, distributed)

    @classmethod
    def _build(cls, run: Run, settings: ReportSettings, distributed: Distributed) -> Report:
        pyro.set_rng_seed(settings.seed)
        started = time.perf_counter()
        x = run.points(settings.max_points)
        plate = settings.data_plate or run.options.data_plate
        d = diagnose(run, x, run.split, num_samples=settings.num_samples, batch_size=100,
                     data_plate=plate, progress=settings.progress and distributed.is_main,
                     distributed=distributed).estimate
        if d.unit == DATA_POINT and not d.conditional and d.num_data > 1:
            try:
                d.elbo_surgery = elbo_surgery(run.model, run.guide, x, data_plate=plate,
                                              num_samples=min(10, settings.num_samples)).summary()
            except ConventionError as e:
                d.notes.append(f"no ELBO surgery: {e}")
        summary = d.summary()
        split = run.split if d.unit == DATA_POINT else "train"
        report = cls(run, settings, d, {"data": run.config["data"], "split": split, **summary},
                     distributed=distributed, started=started)
        report.notes.append(Note(
            f"The numbers below are a fresh estimate (K={settings.num_samples}, seed "
            f"{settings.seed}, {counted(d.num_data, split + ' point')}), not those of the run's "
            "diagnostics.json: they differ from them within their Monte Carlo standard errors."))
        report.notes += [Note(n) for n in d.notes]
        if "khat" in summary:
            report.notes.append(Note(f"Pareto k-hat: {summary['khat']['verdict']}.",
                                     warning=summary["khat"]["share_unreliable"]
                                     > summary["khat"].get("share_unstable", 0)))
        report.figures = [FigureItem(*caption(name, run.history), figure_png(fig))
                          for name, fig in run_figures(run, summary["kl_per_dim"]).items()]
        if d.unit == DATA_POINT:
            report._per_point(x)
        else:
            report._data_set()
        return report

    started: float | None = None

    def _in_budget(self, section: str, without: str | None) -> bool:
        """Whether ``section`` is begun: not once the report has spent its time budget, when a
        note says it was left out and how to have it.  Every rank reads rank 0's clock."""
        budget = self.settings.time_budget
        if not budget or self.started is None:
            return True
        spent = time.perf_counter() - self.started
        over = self.distributed.mean(float(self.distributed.is_main and spent > budget)) > 0
        if over:
            self.notes.append(Note(
                f"Left out: {section}. The report had spent {spent:.0f} s of its time budget of "
                f"{budget:g} s (ReportSettings.time_budget, --time-budget): raise it, or give 0 "
                "for no limit" + (f" ({without} leaves the section out without a note)."
                                  if without else "."), warning=True))
        return not over

    @property
    def plate(self) -> str:
        return self.settings.data_plate or self.run.options.data_plate

    def _data_set(self) -> None:
        """Totals, the joint weights' k-hat and the held-out points' predictive density."""
        summary, name = self.numbers, labels(self.numbers)
        t = summary["total"]

        def total(key):
            se = t.get(f"{key}_se")
            return (f"{t[key]:.3f}", f"{se:.3f}" if se is not None else "")

        k = self.settings.num_samples
        rows = [("ELBO", *total("elbo")), ("reconstruction", *total("reconstruction")),
                (name["kl"], *total("kl_prior"))]
        rows += [(f"  site '{site}' ({e['method']})", f"{e['mean']:.3f}", "")
                 for site, e in summary["kl_sites"].items()]
        rows += [(f"{name['evidence']}, importance sampling K={k}", *total("log_evidence")),
                 (f"evidence gap {name['evidence']} - ELBO", *total("evidence_gap"))]
        self.tables.append(Table(
            f"Summary for the data set the guide was fitted to ({self.diagnostics.num_data} "
            "training points; nats, totals)", ("quantity", "total", "± Monte Carlo SE"), rows))
        self.notes += [Note(f"{n[0].upper()}{n[1:]}.") for n in monte_carlo_kl_notes(summary)]
        if self.settings.ais_points and self._in_budget("annealed importance sampling and BDMC",
                                                        "--ais-points 0"):
            self._annealed(held_out=False)
        ps = held_out_summary(self.run, self.diagnostics,
                              subset(self.run.data.test, self.settings.max_points),
                              num_samples=k, batch_size=100, data_plate=self.plate)
        if ps is not None:
            self.numbers["held_out_predictive"] = ps
            self.tables.append(Table(f"Held-out points ({ps['num_data']} test points): {ps['name']}",
                                     ("quantity", "mean per point", "± SE over points"),
                                     [("log p_q(x)", *_fmt(ps["log_density"]))]))

    def _per_point(self, x: torch.Tensor) -> None:
        d, summary, name = self.diagnostics, self.numbers, labels(self.numbers)
        units = summary["active_units"]
        self.notes.append(Note(
            units["warning"] or f"{units['active']} of {units['total']} latent dimensions are "
            "active.", warning=units["warning"] is not None))
        k = self.settings.num_samples
        self.tables.append(Table(
            f"Summary on {counted(d.num_data, self.run.split + ' point')} (nats per data point)",
            ("quantity", "mean", "± SE over points"),
            [("ELBO", *_fmt(summary["elbo"])),
             (f"reconstruction {name['reconstruction']}", *_fmt(summary["reconstruction"])),
             (name["kl"], *_fmt(summary["kl_prior"])),
             *((f"  site '{site}' ({e['method']})", *_fmt(e))
               for site, e in summary["kl_sites"].items()),
             (f"{name['evidence']}, importance sampling K={k}", *_fmt(summary["log_evidence"])),
             (f"evidence gap {name['evidence']} - ELBO", *_fmt(summary["evidence_gap"]))]))
        self.notes += [Note(f"{n[0].upper()}{n[1:]}.") for n in monte_carlo_kl_notes(summary)]
        exact = self.run.pair.exact(x)
        if exact is not None:
            summary["exact"] = exact_means(exact)
            self.tables.append(Table(
                "Closed forms (the model has them)", ("quantity", "estimated", "exact"),
                [(row, f"{summary[row]['mean']:.4f}", f"{summary['exact'][row]:.4f}")
                 for row in EXACT_ROWS]))
        self.figures.append(FigureItem(
            "Reliability of the evidence estimate",
            "Pareto k-hat of each test point's importance weights: below 0.5 the estimate of "
            "log p(x) is reliable, above 0.7 it is not (Yao et al. 2018).",
            figure_png(plot_khat_histogram(d.khat.numpy()))))
        variances = {site: s["variance"] for site, s in units["sites"].items()}
        self.figures.append(FigureItem(
            "Active units",
            "Variance over test points of each latent dimension's posterior mean (Burda et al. "
            "2016); below 0.01 a dimension carries no information about x.",
            figure_png(plot_active_units(variances, ACTIVE_UNIT_THRESHOLD))))
        projected, axes = latent_projection(d.latent_mean)
        self.figures.append(FigureItem(
            "Latent space", "Posterior means of the test points, coloured by their evidence gap.",
            figure_png(plot_latent_scatter(projected, d.evidence_gap.numpy(),
                                           "evidence gap (nats)", axes))))
        if summary.get("elbo_surgery") is not None:
            s = summary["elbo_surgery"]
            self.tables.append(Table(
                "ELBO surgery (Hoffman & Johnson 2016): the KL to the prior split in two",
                ("quantity", "mean", "± SE over points"),
                [("mean KL(q(z|x) || p(z))", *_fmt(s["mean_kl"])),
                 ("mutual information I_q(x; z)", *_fmt(s["mutual_information"])),
                 ("marginal KL(q(z) || p(z)), q(z) the aggregate posterior",
                  *_fmt(s["marginal_kl"]))]))
            self.notes.append(Note(s["note"] + "."))
        held_out = self.run.split == "test"
        if held_out and self.settings.calibration_simulations and self._in_budget(
                "calibration of the guide", "--calibration-simulations 0"):
            self._calibration(x)
        ais = self._annealed(held_out) if self.settings.ais_points and self._in_budget(
            "annealed importance sampling and BDMC", "--ais-points 0") else None
        if not held_out:
            self.notes.append(Note("No amortization gap: the guide has parameters per training "
                                   "point (it is not amortized), so it is already the local "
                                   "guide q*."))
        elif self.settings.amortization_points and self._in_budget(
                "the gap's split into approximation and amortization", "--amortization-points 0"):
            self._gap_decomposition(ais)
        if held_out and self._in_budget("guide draws for ArviZ (inference_data.nc)", None):
            self.idata = guide_inference_data(
                self.run.model, self.run.guide,
                subset(self.run.data.test, self.settings.idata_points),
                num_draws=self.settings.idata_draws)

    def _calibration(self, x: torch.Tensor) -> None:
        """Simulation-based calibration of the amortized guide: the verdict per latent
        coordinate, and the ECDF-difference plot of the worst ones."""
        try:
            c = calibration(self.run.model, self.run.guide, x,
                            num_simulations=self.settings.calibration_simulations,
                            seed=self.settings.seed, data_plate=self.plate)
        except ConventionError as e:
            self.notes.append(Note(f"No simulation-based calibration: {e}", warning=True))
            return
        s = self.numbers["calibration"] = c.summary()
        rows = [(f"{name}[{d['dim']}]", f"{d['p_adjusted']:.3g}", f"{d['spread_z']:+.2f}",
                 f"{d['shift_z']:+.2f}", d["verdict"])
                for name, dims in s["sites"].items() for d in dims]
        self.tables.append(Table(
            f"Calibration of the guide ({counted(s['num_simulations'], 'point')} simulated from the model, "
            f"{s['num_draws']} guide draws each)",
            ("coordinate", "Holm p", "spread z", "shift z", "verdict"), rows))
        self.notes.append(Note(
            f"{len(s['miscalibrated'])} of {len(rows)} latent coordinates miscalibrated "
            "(simulation-based calibration: spread z > 0, ranks at both ends, q too narrow; "
            "shift z > 0, the truth above q's draws).", warning=bool(s["miscalibrated"])))
        self.figures.append(FigureItem(
            "Calibration of the guide",
            "ECDF of each coordinate's fractional rank of the simulating z among the guide's "
            "draws, less the uniform one, with the simultaneous 95 % band of a calibrated guide "
            "(Säilynoja et al. 2022), the worst coordinates first.",
            figure_png(c.ecdf_figure())))

    def _annealed(self, held_out: bool):
        """AIS beside importance sampling on a few test points (a pair diagnosed on its training
        set: on that set, the data its guide was fitted to), and the BDMC bracket.  AIS starts
        from the guide, or from the prior where the guide cannot start it (a point mass)."""
        s, run = self.settings, self.run
        xa = subset(run.data.test, s.ais_points) if held_out else run.points()
        where = "test points" if held_out else "training points (the data the guide was fitted to)"
        options = {"num_chains": s.ais_chains, "num_steps": s.ais_steps,
                   "data_plate": self.plate, "progress": s.progress, "seed": s.seed,
                   "distributed": self.distributed}
        if not held_out:
            # A guide with parameters per training point runs on its whole training set only.
            options["batch_size"] = len(xa)
        for start in ("guide", "prior"):
            try:
                both = ais_beside_importance(run.model, run.guide, xa, num_samples=s.num_samples,
                                             start=start, **options)
                break
            except ConventionError as e:
                if start == "prior":
                    self.notes.append(Note(f"No annealed importance sampling: {e}", warning=True))
                    return None
                self.notes.append(Note(f"AIS starts from the prior: from the guide, {e}"))
        options["start"] = start
        a = self.numbers["ais"] = {**both["ais"], "ais_minus_is": both["ais_minus_is"]}
        if "where_khat_high" in both:
            a["where_khat_high"] = both["where_khat_high"]
            self.notes.append(Note(f"AIS beside importance sampling: "
                                   f"{both['where_khat_high']['reading']}."))
        per_point = {key: np.asarray(values, dtype=float)  # k-hat's None: NaN
                     for key, values in both["per_point"].items()}
        rows = [("log p(x), AIS", *_fmt(a["log_evidence"])),
                (f"log p(x), importance sampling K={s.num_samples}",
                 *_fmt(both["importance"]["log_evidence"])),
                ("AIS - importance sampling", *_fmt(a["ais_minus_is"])),
                ("ELBO (the chains' starting draws)" if start == "guide" else
                 f"ELBO (the importance sampler's K={s.num_samples} draws)", *_fmt(a["elbo"])),
                ("evidence gap, AIS", *_fmt(a["evidence_gap"]))]
        if s.bdmc:
            b = self.numbers["bdmc"] = bdmc(run.model, run.guide, xa, **options).summary()
            rows += [(f"BDMC on {b['num_data']} simulated points: lower bound (forward AIS)",
                      f"{b['lower']:.3f}", ""),
                     ("BDMC: upper bound (reverse AIS)", f"{b['upper']:.3f}", ""),
                     ("BDMC bracket upper - lower", *_fmt({"mean": b["bracket"],
                                                           "se": b["bracket_se"]}))]
            self.notes.append(Note(f"BDMC bracket {b['bracket']:.3f} nats: "
                                   f"{bracket_reading(b)}."))
        self.tables.append(Table(
            f"Annealed importance sampling ({len(xa)} {where}, {s.ais_chains} chains x "
            f"{s.ais_steps} HMC steps from the {start}; acceptance "
            f"{a['acceptance']['mean']:.2f})",
            ("quantity", "mean", "± SE over points"), rows))
        self.figures.append(FigureItem(
            "AIS beside importance sampling",
            "Per point, AIS minus importance sampling against importance sampling's log p(x),"
            " coloured by its Pareto k-hat: points with k-hat > 0.7 are where importance sampling "
            "falls short. BDMC brackets the true log p(x) on data simulated from the model.",
            figure_png(plot_ais_vs_importance(per_point["importance"], per_point["ais"],
                                              per_point["khat"]))))
        return torch.as_tensor(per_point["ais"])

    def _gap_decomposition(self, ais=None) -> None:
        """Approximation and amortization gaps (Cremer et al. 2018) on a few test points."""
        s, run = self.settings, self.run
        xa = subset(run.data.test, s.amortization_points)
        start = time.perf_counter()
        try:
            gaps = split_gap(run.model, run.guide, xa, steps=s.amortization_steps,
                             num_samples=s.num_samples, seed=s.seed,
                             distributed=self.distributed)
        except ConventionError as e:
            self.notes.append(Note(f"Amortization gap not computed: {e}", warning=True))
            return
        self.numbers["gap_decomposition"] = g = {
            **gaps.summary(), "steps": s.amortization_steps,
            "seconds": time.perf_counter() - start}
        self.tables.append(Table(
            f"Where the gap comes from ({g['num_data']} test points, local guide q* fitted with "
            f"{s.amortization_steps} SVI steps)", ("quantity", "mean", "± SE over points"),
            [("log p(x) (q* as proposal)", *_fmt(g["log_evidence"])),
             ("ELBO of the encoder", *_fmt(g["elbo_amortized"])),
             ("ELBO of q*", *_fmt(g["elbo_local"])),
             ("approximation gap log p(x) - ELBO[q*]", *_fmt(g["approximation_gap"])),
             ("amortization gap ELBO[q*] - ELBO[encoder]", *_fmt(g["amortization_gap"]))]
            + self._approximation_gap_with_ais(gaps, ais)))
        self.figures.append(FigureItem(
            "Gap decomposition",
            "Approximation gap: what the mean-field family cannot capture. Amortization gap: "
            "what sharing one encoder across data points costs (Cremer et al. 2018).",
            figure_png(plot_gap_decomposition(gaps.approximation_gap.numpy(),
                                              gaps.amortization_gap.numpy()))))

    def _approximation_gap_with_ais(self, gaps, ais: torch.Tensor | None
                                    ) -> list[tuple[str, str, str]]:
        """The approximation gap with AIS's log p(x) per point (``ais``; Cremer et al. 2018),
        on the points both cover: subsets of the test set are nested, so AIS's points come
        first."""
        if ais is None:
            return []
        m = min(len(ais), len(gaps.elbo_local))
        gap = ais[:m] - gaps.elbo_local[:m]
        self.numbers["gap_decomposition"]["approximation_gap_ais"] = summary = mean_and_se(gap)
        return [(f"approximation gap with AIS log p(x) (first {m} points)", *_fmt(summary))]

    @property
    def subtitle(self) -> str:
        c, d = self.run.config, self.diagnostics
        unit = (f"N={counted(d.num_data, self.numbers['split'] + ' point')}" if d.unit == DATA_POINT else
                f"unit: the data set (N={d.num_data} training points)")
        return (f"run {self.run.dir} · data {c['data']} · model {c['model']} · guide "
                f"{c['guide']} · K={self.settings.num_samples} · {unit}")

    def html(self) -> str:
        return render_html("elbogap report", self.subtitle, self.notes, self.tables, self.figures)

    def _repr_html_(self) -> str:
        return self.html()

    def __repr__(self) -> str:
        return (f"<Report of {self.subtitle}: {len(self.tables)} tables, {len(self.figures)} "
                "figures; .write() saves report.html and report.json>")

    def write(self, run_dir: str | Path | None = None) -> list[Path]:
        """report.html, report.json (and inference_data.nc) in ``run_dir`` (default: the run's)."""
        run_dir = Path(run_dir) if run_dir is not None else self.run.dir
        written = [run_dir / "report.html", run_dir / "report.json"]
        write_text_atomic(written[0], self.html())
        write_json_atomic(written[1], self.numbers)
        if self.idata is not None:
            written.append(run_dir / "inference_data.nc")
            save_inference_data(self.idata, written[-1])
        return written
