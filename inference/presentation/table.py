"""Diagnostics as text: the summary table a terminal shows, the held-out predictive block, and
estimates set beside a model's closed forms."""

from __future__ import annotations

import html
import math

from ..foundations.wording import counted


def labels(summary: dict) -> dict[str, str]:
    """What the quantities are called for this pair: log p(x) for a model of x, whatever its
    observed site is named (every verdict and note says log p(x) too: one name in one
    output), log p(y | inputs) for a conditional model (its observed sites hold only part of
    the data, y the observed site's name)."""
    observed = summary.get("observed") or ["x"]
    y = observed[0] if len(observed) == 1 and summary.get("conditional") else "x"
    if summary.get("unit") == "data set":
        y = f"{y}_1..N"
    if summary.get("conditional"):
        return {"evidence": f"log p({y} | inputs)",
                "reconstruction": f"E_q[log p({y} | z, inputs)]",
                "kl": "KL(q(z | data) || p(z | inputs))"}
    kl = "KL(q || p)  all latent variables" if summary.get("unit") == "data set" else \
        f"KL(q(z|{y}) || p(z))"
    return {"evidence": f"log p({y})", "reconstruction": f"E_q[log p({y}|z)]", "kl": kl}


def monte_carlo_kl_notes(summary: dict) -> list[str]:
    """A sentence per latent site whose KL to the prior is a Monte Carlo mean, not a closed
    form (every table of a summary says so beside it, text or HTML)."""
    return [f"the KL of site '{site}' is the Monte Carlo mean of log q(z) - log p(z) over the "
            "K draws (no closed form for its distributions, or none valid in the guide's order)"
            for site, e in summary["kl_sites"].items() if e["method"] == "monte-carlo"]


def summary_rows(summary: dict) -> tuple[str, str, list[tuple[str, dict | None]], list[str]]:
    """The table of a summary: its unit's heading, the value column's name, the rows (label,
    {"mean", "se"}), and the lines of notes under it."""
    name, k = labels(summary), summary["num_samples"]
    data_set = summary.get("unit") == "data set"
    if data_set:
        t = summary["total"]

        def entry(key):
            return {"mean": t[key], "se": t.get(f"{key}_se")} if t[key] is not None else None
    else:
        def entry(key):
            return summary[key]
    rows = [("ELBO", entry("elbo")),
            (f"  reconstruction  {name['reconstruction']}", entry("reconstruction")),
            (f"  {name['kl']}", entry("kl_prior"))]
    rows += [(f"    site '{site}' ({e['method']})", e) for site, e in summary["kl_sites"].items()]
    rows += [(f"{name['evidence']}  importance sampling, K={k}", entry("log_evidence")),
             (f"evidence gap  {name['evidence']} - ELBO", entry("evidence_gap"))]
    notes = []
    if not data_set:
        notes += [f"note: {n}" for n in monte_carlo_kl_notes(summary)]
        mc = summary.get("log_evidence_mc_se")
        if mc is not None:
            notes.append(f"(Monte Carlo SE of {name['evidence']} per data point, mean over "
                         f"points: {mc:.3f})")
    else:
        notes += [f"note: {n}" for n in summary.get("notes", [])]
    khat = summary.get("khat")
    if khat is not None:
        spread = (f"median {khat['median']:.2f}, max {khat['max']:.2f}; "
                  if not data_set and khat["median"] is not None else "")
        notes.append(f"Pareto k-hat: {spread}{khat['verdict']}")
    if data_set:
        notes.append(f"importance-sampling ESS: {number(summary['ess']['mean'], '.1f')} of "
                     f"{_draws(summary)}")
        return f"nats for the data set, N={summary['num_data']}", "total", rows, notes
    if "ess" in summary:
        notes.append(f"importance-sampling ESS: mean {number(summary['ess']['mean'], '.1f')} "
                     f"of {_draws(summary)} (min {number(summary['ess']['min'], '.1f')})")
    units = summary.get("active_units") or {}
    if units.get("total"):
        notes.append(f"active units (Cov_x E_q[z] > 0.01): {units['active']} of {units['total']}")
        if units["warning"]:
            notes.append(f"WARNING: {units['warning']}")
    notes += [f"note: {n}" for n in summary.get("notes", [])]
    surgery = summary.get("elbo_surgery")
    if surgery is not None:
        rows += [("ELBO surgery: mutual information I_q(x; z)", surgery["mutual_information"]),
                 ("  marginal KL(q(z) || p(z))", surgery["marginal_kl"])]
        notes.append(f"note: {surgery['note']}")
    return f"nats per data point, N={summary['num_data']}", "mean", rows, notes


def _draws(summary: dict) -> str:
    """The draws behind the ESS: K, or K and a defensive proposal's prior draws."""
    k, of = summary["num_samples"], summary["ess"].get("of", summary["num_samples"])
    return f"K={k}" if of == k else f"{of} draws (K={k} from q, {of - k} from the prior)"


# Where a number is not one (NaN, infinite: null in the files), the tables say so; the
# summary's notes say why.
NOT_A_NUMBER = "not a number"


def number(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``; where it is None, NaN or infinite, "n/a" as wide."""
    if value is None or not math.isfinite(value):
        width = "".join(c for c in spec.split(".")[0] if c.isdigit())
        return f"{'n/a':>{width or 0}}"
    return format(value, spec)


def _fmt(entry: dict | None) -> str:
    if entry is None:
        return ""
    se = entry.get("se")
    if entry["mean"] is None or not math.isfinite(entry["mean"]):
        return f"{NOT_A_NUMBER:>12}"
    mean = f"{entry['mean']:12.3f}"
    return f"{mean}   ± {se:.3f}" if se is not None else mean


def format_summary(summary: dict) -> str:
    """The summary as a terminal table: means (± SE over data points) or a data set's totals
    (± Monte Carlo SE), in nats, then the notes."""
    heading, column, rows, notes = summary_rows(summary)
    se = "± Monte Carlo SE" if column == "total" else "± SE"
    width = max(len(name) for name, _ in rows)
    lines = [f"{heading:<{width}}  {column:>12}   {se}"]
    lines += [f"{name:<{width}}  {_fmt(entry)}" for name, entry in rows]
    return "\n".join(lines + notes)


def summary_html(summary: dict) -> str:
    """The summary as an HTML table (what a notebook shows for a Diagnostics)."""
    heading, column, rows, notes = summary_rows(summary)

    def cell(entry, key):
        value = None if entry is None else entry.get(key)
        return "" if value is None else f"{value:.3f}"

    body = "".join(
        f"<tr><td style='text-align:left'>{html.escape(name.strip())}</td>"
        f"<td>{cell(e, 'mean')}</td><td>{cell(e, 'se')}</td></tr>" for name, e in rows)
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return (f"<table><thead><tr><th style='text-align:left'>{html.escape(heading)}</th>"
            f"<th>{column}</th><th>± SE</th></tr></thead><tbody>{body}</tbody></table>"
            f"<ul>{items}</ul>")


def format_annealed(summary: dict, importance: dict | None = None) -> str:
    """AIS beside importance sampling on the same points, and the BDMC bracket when present."""
    a = summary["ais"]
    data_set = a.get("unit") == "data set"
    on = (f"of log p(x_1..N) of the whole data set, N={a['num_data']}" if data_set
          else f"on {counted(a['num_data'], 'point')}")
    lines = [f"annealed importance sampling {on}: {a['num_chains']} chains x "
             f"{a['num_steps']} steps from the {a['start']} (HMC acceptance "
             f"{a['acceptance']['mean']:.2f}, step size {a['step_size']['mean']:.3f})"]
    rows = [("log p(x)  AIS", a["log_evidence"])]
    if "evidence_gap" in a:
        rows += [("ELBO  (the chains' starting draws)", a["elbo"]),
                 ("evidence gap  log p(x) AIS - ELBO", a["evidence_gap"])]
    if importance is not None:
        k = importance["num_samples"]
        rows += [(f"log p(x)  importance sampling, K={k}", importance["log_evidence"]),
                 ("AIS - importance sampling", summary["ais_minus_is"])]
    width = max(len(name) for name, _ in rows)
    lines += [f"{name:<{width}}  {_fmt(entry)}" for name, entry in rows]
    lines.append(f"(Monte Carlo SE of the AIS log p(x_1..N): {a['log_evidence_mc_se']:.3f})"
                 if data_set else f"(Monte Carlo SE of the AIS log p(x) per point, mean over "
                 f"points: {a['log_evidence_mc_se']:.3f})")
    if "convergence" in a:
        lines.append(a["convergence"]["reading"])
    lines += [f"note: {n}" for n in a.get("notes", []) if n != a.get("convergence", {}).get("reading")]
    if importance is not None and importance.get("khat"):
        lines.append(f"importance sampling's Pareto k-hat: {importance['khat']['verdict']}")
    if "where_khat_high" in summary:
        lines.append(summary["where_khat_high"]["reading"])
    return "\n".join(lines)


def format_bdmc(summary: dict) -> str:
    b = summary
    se = f" ± {b['bracket_se']:.3f}" if b.get("bracket_se") is not None else ""
    simulated = (f"{b['data_sets']} data sets of {counted(b['num_data'], 'point')}" if b.get("data_sets")
                 else counted(b['num_data'], 'point'))
    return (f"BDMC on {simulated} simulated from the model ({b['num_chains']} chains x "
            f"{b['num_steps']} steps): log p(x) between {b['lower']:.3f} (forward AIS) and "
            f"{b['upper']:.3f} (reverse AIS); bracket {b['bracket']:.3f}{se} nats: "
            + bracket_reading(b))


def bracket_reading(b: dict) -> str:
    """What a BDMC bracket says of the AIS setting (its bounds hold in expectation only)."""
    check = b.get("check", "passed" if b["bracket"] >= 0 else "inside the noise")
    if check == "failed":
        return ("FAILED: the upper bound lies below the lower by more than 3 of its SEs, which "
                "no Monte Carlo noise explains: these AIS numbers cannot be trusted on this pair "
                "(a program whose latents AIS cannot move, or a density it mis-reads)")
    if check == "unknown":
        return ("the upper bound came out below the lower, and with one bracket there is no SE "
                "to tell noise from failure: simulate more points")
    if check == "inside the noise":
        return ("the upper bound came out below the lower: each is a Monte Carlo estimate, "
                "bounding log p(x) only in expectation, and they cross by less than 3 SEs, "
                "inside their noise; on data like yours this AIS setting is as tight as that "
                "noise lets BDMC tell")
    return "on data like yours this AIS setting is within about that of the true log p(x)"


def format_predictive(summary: dict) -> str:
    """One block for held-out points of a pair with global latents (no evidence gap there)."""
    entry = summary["log_density"]
    lines = [f"held-out points, N={summary['num_data']}: {summary['name']}, K={summary['num_samples']}",
             f"  mean per point {entry['mean']:.3f} ± {entry['se'] or float('nan'):.3f} "
             f"(sum {summary['total']:.3f})"]
    if "khat" in summary:
        lines.append(f"  Pareto k-hat: {summary['khat']['verdict']}")
    return "\n".join(lines)


def format_exact_comparison(comparison: dict[str, dict]) -> str:
    """``elbogap.runs.pairs.exact_comparison``'s rows: estimated beside closed-form values, and
    z = mean difference / its standard error."""
    lines = [f"{'closed form vs estimate, nats per point':<28}{'estimated':>12}{'exact':>12}"
             f"{'difference':>12}{'z':>7}"]
    for name, row in comparison.items():
        lines.append(f"{name:<28}{number(row['estimated'], '12.4f')}"
                     f"{number(row['exact'], '12.4f')}{number(row['difference'], '12.4f')}"
                     f"{number(row['z'], '7.2f')}")
    return "\n".join(lines)


def format_run_summary(summary: dict) -> str:
    """A run's summary as the commands print it: the table, and where the summary has them the
    held-out points' predictive density, the closed forms beside the estimates, and the
    evidence under the model that generated the data."""
    blocks = [format_summary(summary)]
    if "held_out_predictive" in summary:
        blocks.append(format_predictive(summary["held_out_predictive"]))
    if "exact_comparison" in summary:
        blocks.append(format_exact_comparison(summary["exact_comparison"]))
    if "data_generating_log_evidence" in summary and summary["unit"] == "data point":
        blocks.append("log p(x) under the model that generated the data: "
                      f"{number(summary['data_generating_log_evidence'], '.4f')}")
    return "\n".join(blocks)
