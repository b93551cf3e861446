"""Runs side by side: one table of their diagnostics on the same points, paired differences
against the first run, and their training curves overlaid, in one self-contained HTML page."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch

from ..diagnostics.amortization import split_gap
from ..diagnostics.evaluation import evaluate
from ..diagnostics.results import DATA_POINT, Diagnostics
from ..foundations.atomic import write_json_atomic, write_text_atomic
from ..foundations.errors import ConfigError, ConventionError, OptionError
from ..foundations.program_data import ProgramData
from ..foundations.statistics import mean_and_se
from ..foundations.wording import counted
from ..presentation.figures import figure_png, plot_runs_overlaid
from ..presentation.html import FigureItem, Note, Table, render_html
from .run_directory import Run, load_run

PAIRED = ("elbo", "log_evidence", "evidence_gap")


@dataclass
class Comparison:
    """Each run's summary on the shared points (``summaries``), the paired differences of
    ``PAIRED`` quantities against the first run, and the runs' histories."""

    names: list[str]
    summaries: list[dict]
    paired: list[dict | None]
    histories: list[list[dict]]
    notes: list[str] = field(default_factory=list)

    def table(self) -> Table:
        header = ("quantity", *self.names)

        def cell(entry):
            if entry is None or entry.get("mean") is None:
                return ""
            se = entry.get("se")
            return f"{entry['mean']:.3f}" + (f" ± {se:.3f}" if se is not None else "")

        rows = [(label, *(cell(s.get(key)) for s in self.summaries)) for key, label in (
            ("elbo", "ELBO"), ("log_evidence", "log p(x), importance sampling"),
            ("evidence_gap", "evidence gap"))]
        for key, label in (("elbo", "ELBO"), ("log_evidence", "log p(x)"),
                           ("evidence_gap", "gap")):
            rows.append((f"{label} − first run's, paired",
                         *(cell(p[key]) if p is not None else "" for p in self.paired)))
        for key, label in (("approximation_gap", "approximation gap log p(x) − ELBO[q*]"),
                           ("amortization_gap", "amortization gap ELBO[q*] − ELBO")):
            if any(s.get("gap_decomposition") for s in self.summaries):
                rows.append((label, *(cell(s["gap_decomposition"][key])
                                      if s.get("gap_decomposition") else "n/a"
                                      for s in self.summaries)))
        rows.append(("points with k-hat > 0.7", *(
            f"{100 * s['khat']['share_unreliable']:.1f} %" if s.get("khat") else ""
            for s in self.summaries)))
        rows.append(("active units", *(
            f"{s['active_units']['active']} of {s['active_units']['total']}"
            if s.get("active_units", {}).get("total") else "" for s in self.summaries)))
        if any(s.get("elbo_surgery") for s in self.summaries):  # --surgery only
            rows.append(("mutual information I_q(x; z)", *(
                cell(s["elbo_surgery"]["mutual_information"]) if s.get("elbo_surgery")
                else "n/a" for s in self.summaries)))
        return Table("Runs side by side (nats per data point, mean ± SE over points)", header, rows)

    def html(self) -> str:
        figure = FigureItem("Training curves overlaid",
                            "Held-out ELBO and evidence gap of every run over its epochs.",
                            figure_png(plot_runs_overlaid(self.names, self.histories)))
        return render_html("elbogap comparison", " · ".join(self.names),
                           [Note(n) for n in self.notes], [self.table()], [figure])

    def _repr_html_(self) -> str:
        return self.html()

    def write(self, out: str | Path) -> list[Path]:
        out = writable_directory(out)
        write_text_atomic(out / "compare.html", self.html())
        write_json_atomic(out / "compare.json", {"runs": self.names, "summaries": self.summaries,
                                                  "paired": self.paired, "notes": self.notes})
        return [out / "compare.html", out / "compare.json"]


def _same_points(runs: list[Run]) -> bool:
    first = runs[0]
    return all(r.split == first.split and _same_data(r.data.test, first.data.test)
               for r in runs[1:])


def _same_data(a: torch.Tensor | ProgramData, b: torch.Tensor | ProgramData) -> bool:
    """The same tensor, or the same program arguments (names, rows and values)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape \
            and torch.equal(a, b)
    left, right = dict(a.tensors()), dict(b.tensors())
    return left.keys() == right.keys() and all(
        left[k].shape == right[k].shape and torch.equal(left[k], right[k]) for k in left)


def _paired(d: Diagnostics, first: Diagnostics) -> dict:
    out = {}
    for key in PAIRED:
        diff = (getattr(d, key) - getattr(first, key)).double()
        out[key] = mean_and_se(diff)
    return out


def writable_directory(out: str | Path) -> Path:
    """``out`` made where it is missing; a file there, or a directory that cannot be made, is
    an error naming ``--out`` (checked before any run is evaluated, and again on writing)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OptionError("out", f"{{option}} {out}: is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OptionError("out", f"{{option}} {out}: cannot make it ({e.strerror})") from None
    return out


def compare(run_dirs: list[str | Path], *, num_samples: int = 1000, points: int | None = 500,
            seed: int = 0, surgery: bool = False, amortization_points: int = 0,
            amortization_steps: int = 500, trust_code: bool = False,
            trust_model_file: bool = False) -> Comparison:
    """Evaluate every run on the same ``points`` test points (a fixed random subset) with the
    same seed and K, and set them side by side; with ``amortization_points`` also each run's
    approximation and amortization gaps on that many of them (``split_gap``: q* of the guide's
    own family, or the guide fine-tuned on each point, as the notes say per run).
    ``trust_code``, ``trust_model_file``: as ``load_run``'s."""
    if len(run_dirs) < 2:
        raise ConfigError("compare needs at least two run directories")
    runs = [load_run(d, trust_code=trust_code, trust_model_file=trust_model_file)
            for d in run_dirs]
    names = [Path(d).name or str(d) for d in run_dirs]
    notes = []
    shared = _same_points(runs)
    if not shared:
        notes.append("The runs are not diagnosed on the same points (other data, or a split of "
                      "their own): no paired differences, each run on its own points.")
    diagnostics = []
    for run in runs:
        # Each run from the same seed, so that differences are the runs', not the draws'.
        pyro.set_rng_seed(seed)
        d = evaluate(run.model, run.guide, run.points(points), num_samples=num_samples,
                     batch_size=100, data_plate=run.options.data_plate,
                     surgery=surgery and run.split == "test")
        if d.unit != DATA_POINT:
            raise ConfigError(f"{run.dir}: a pair with global latents (one unit, the data set) has "
                              "no per-point numbers to compare")
        diagnostics.append(d)
    summaries = [d.summary() for d in diagnostics]
    for name, run, summary in zip(names, runs, summaries, strict=True):
        if amortization_points and run.split == "test":
            pyro.set_rng_seed(seed)
            try:
                gaps = split_gap(run.model, run.guide, run.points(amortization_points),
                                 steps=amortization_steps, num_samples=num_samples,
                                 data_plate=run.options.data_plate)
            except ConventionError as e:
                notes.append(f"{name}: no approximation/amortization split: {e}")
                continue
            summary["gap_decomposition"] = gaps.summary()
            notes.append(f"{name}: q* of the gap's split is {gaps.q_star}.")
    paired = [None] + [_paired(d, diagnostics[0]) if shared else None for d in diagnostics[1:]]
    k = num_samples
    notes.append(f"Every run evaluated afresh on {counted(summaries[0]['num_data'], 'point')} with K={k} and "
                 f"seed {seed}; a paired difference is the mean over points of the per-point "
                 "difference, its SE that mean's (smaller than either run's own SE, which holds "
                 "the spread between points).")
    return Comparison(names, summaries, paired, [r.history for r in runs], notes)
