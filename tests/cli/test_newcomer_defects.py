"""What a new user met (issue #26, points 5-6): errors that were not one line, flags silently
ignored, readings left without comment."""

import numpy as np
import pytest
import torch

from elbogap import FitOptions
from elbogap.presentation.figures import plot_latent_scatter
from elbogap.presentation.table import format_bdmc, labels
from elbogap.runs.compare import Comparison
from elbogap.runs.report import latent_projection
from tests.cli.test_scripts import run


def one_line(result, message):
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_compare_out_naming_a_file_is_one_line_before_any_run_is_evaluated(tmp_path):
    (tmp_path / "taken").write_text("")
    result = run("compare.py", "runs/a", "runs/b", "--out", str(tmp_path / "taken"))
    one_line(result, f"--out {tmp_path / 'taken'}: is a file, not a directory")


def test_compare_help_says_what_q_star_is():
    assert "fine-tuned on each point" in " ".join(run("compare.py", "--help").stdout.split())


@pytest.mark.parametrize("flags", [["--points", "50"], ["--chains", "4"], ["--ais-steps", "9"]])
def test_evaluate_refuses_ais_flags_without_ais(flags):
    one_line(run("evaluate.py", "runs/any", *flags), "for --method ais and --bdmc only")


def test_under_torchrun_only_rank_0_states_an_error(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    quiet = run("fit.py", "--epochs", "0")
    assert quiet.returncode == 2 and quiet.stderr == ""
    monkeypatch.setenv("RANK", "0")
    one_line(run("fit.py", "--epochs", "0"), "epochs must be a positive integer")
    monkeypatch.setenv("RANK", "1")
    parsed = run("fit.py", "--epochs", "x")  # argparse's errors too
    assert parsed.returncode == 2 and parsed.stderr == ""


def test_fit_options_from_python_name_the_field_not_the_flag():
    import pyro
    import pyro.distributions as dist

    from elbogap import fit

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(pyro.sample("z", dist.Normal(0.0, 1.0)), 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(Exception) as error:
        fit(model, guide, torch.zeros(4), FitOptions(device="cuda:7", epochs=1, batch_size=4))
    assert str(error.value).startswith("device ") and "--" not in str(error.value)


def test_a_bdmc_bracket_below_zero_is_read_for_what_it_is():
    crossed = {"num_data": 10, "num_chains": 4, "num_steps": 50, "lower": -10.0,
               "upper": -10.2, "bracket": -0.2, "bracket_se": 0.1}
    assert "upper bound came out below the lower" in format_bdmc(crossed)
    assert "upper bound came out below" not in format_bdmc({**crossed, "upper": -9.8,
                                                             "bracket": 0.2})


def test_one_dimensional_latents_plot_the_value_against_z_not_a_second_axis():
    means, axes = latent_projection({"z": torch.randn(30, 1)})
    assert means.shape == (30, 1)
    fig = plot_latent_scatter(means, np.arange(30.0), "evidence gap (nats)", axes)
    (ax,) = fig.axes  # no colour bar: the value is the vertical axis
    assert ax.get_ylabel() == "evidence gap (nats)" and ax.get_xlabel() == "E_q[z]"


def test_mutual_information_rows_only_where_surgery_ran():
    summary = {"elbo": {"mean": -1.0, "se": 0.1}, "active_units": {"active": 1, "total": 2}}
    plain = Comparison(["a", "b"], [summary, summary], [None, None], [[], []], [])
    assert not any("mutual information" in row[0] for row in plain.table().rows)
    surgery = {**summary, "elbo_surgery": {"mutual_information": {"mean": 2.0, "se": 0.1}}}
    both = Comparison(["a", "b"], [surgery, summary], [None, None], [[], []], [])
    (row,) = [r for r in both.table().rows if "mutual information" in r[0]]
    assert row[1:] == ("2.000 ± 0.100", "n/a")


def test_a_model_of_x_is_labelled_log_p_x_whatever_its_observed_site_is_named():
    assert labels({"observed": ["obs"]})["evidence"] == "log p(x)"
    assert labels({"observed": ["y"], "conditional": True})["evidence"] == "log p(y | inputs)"


LAPLACE_PAIR = '''
import pyro
import pyro.distributions as dist
import torch


def make_pair(data_dim, latent_dim=2):
    """z ~ StudentT(3, 0, 1): KL(Normal || StudentT) has no closed form (Monte Carlo)."""

    def model(x):
        w = pyro.param("w", 0.1 * torch.ones(latent_dim, data_dim))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.StudentT(3.0, x.new_zeros(latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ w, 1.0).to_event(1), obs=x)

    def guide(x):
        a = pyro.param("a", torch.zeros(data_dim, latent_dim))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ a, 1.0).to_event(1))

    return model, guide
'''


def test_the_html_report_says_where_a_kl_is_monte_carlo(tmp_path):
    from elbogap import Report, load_run

    (tmp_path / "pair.py").write_text(LAPLACE_PAIR)
    result = run("fit.py", "--model", f"{tmp_path / 'pair.py'}:make_pair", "--epochs", "1",
                 "--eval-samples", "5", "--eval-points", "10", "--no-progress",
                 "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    report = Report.build(load_run(tmp_path / "run", trust_model_file=True), num_samples=30,
                          max_points=20, amortization_points=0, idata_points=2, idata_draws=10,
                          ais_points=0,
                          progress=False)
    page = report._repr_html_()
    assert "site &#x27;z&#x27; (monte-carlo)" in page or "site 'z' (monte-carlo)" in page
    assert "is the Monte Carlo mean of log q(z) - log p(z)" in page


def test_the_final_evaluation_estimate_counts_fixed_costs_once(monkeypatch):
    """A pair whose evaluation costs 0.5 s per call (checks, a cold first call) plus 1 ms per
    draw: 297 points x K=1000 take 0.5 + 297 s.  One probe of 20 points x K=50 scaled up said
    0.5 * 297 + 297 = 445.5 s; the difference of two probes says 297.5 s."""
    from types import SimpleNamespace

    from elbogap.runs import diagnose

    clock = [0.0]

    def evaluate(model, guide, x, *, num_samples, data_plate, batch_size=None):
        clock[0] += 0.5 + 1e-3 * x.shape[0] * num_samples

    monkeypatch.setattr(diagnose, "evaluate", evaluate)
    monkeypatch.setattr(diagnose.time, "perf_counter", lambda: clock[0])
    run_ = SimpleNamespace(model=None, guide=None, config={"num_samples": 1000},
                           options=SimpleNamespace(data_plate=None))
    seconds = diagnose.final_evaluation_seconds(run_, torch.zeros(297, 3))
    assert seconds == pytest.approx(0.5 + 297.0)
    assert diagnose.final_evaluation_seconds(run_, torch.zeros(297, 3), processes=2) == \
        pytest.approx(0.5 + 148.5)
