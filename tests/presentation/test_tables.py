"""Summaries shown as the commands print them and as Jupyter shows them: from numbers alone."""

from elbogap.presentation.table import format_run_summary, format_summary, summary_html


def summary(**extra):
    entry = {"mean": -5.0, "se": 0.1}
    return {"unit": "data point", "num_data": 3, "num_samples": 50, "observed": ["y"],
            "conditional": True, "elbo": entry, "reconstruction": entry, "kl_prior": entry,
            "log_evidence": entry, "evidence_gap": {"mean": 0.2, "se": 0.01},
            "kl_sites": {"<script>z": {"mean": 1.0, "se": 0.1, "method": "monte-carlo"}},
            "log_evidence_mc_se": 0.05, "ess": {"mean": 40.0, "min": 3.0},
            "active_units": {"total": 2, "active": 1, "warning": None}, "notes": [], **extra}


def test_a_conditional_models_table_names_what_it_estimates():
    text = format_summary(summary())
    assert text.splitlines()[0].startswith("nats per data point, N=3")
    assert "log p(y | inputs)  importance sampling, K=50" in text
    assert "is the Monte Carlo mean of log q(z) - log p(z)" in text and "active units" in text


def test_the_html_table_escapes_names_that_come_from_a_pair():
    page = summary_html(summary())
    assert "<script>" not in page and "&lt;script&gt;z" in page


def test_a_run_summary_shows_what_it_holds_and_nothing_else():
    plain = format_run_summary(summary())
    assert plain == format_summary(summary())
    exact = {"elbo": {"estimated": -5.0, "exact": -5.01, "difference": 0.01, "z": 0.5}}
    predictive = {"name": "log posterior predictive density", "num_data": 4, "num_samples": 50,
                  "log_density": {"mean": -3.0, "se": 0.2}, "total": -12.0}
    both = format_run_summary(summary(exact_comparison=exact, held_out_predictive=predictive))
    assert "closed form vs estimate" in both and "held-out points, N=4" in both
