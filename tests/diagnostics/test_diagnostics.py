"""evaluate() on pairs that are not the VAE, and the estimators' statistical behaviour."""

import math

import pytest
import torch

from elbogap.diagnostics.evaluation import evaluate
from elbogap.foundations.errors import ConfigError, ConventionError
from elbogap.foundations.statistics import importance_stats
from tests.pairs import (
    plated_features_guide,
    plated_features_model,
    two_site_guide,
    two_site_model,
)

FIELDS = ("elbo", "elbo_se", "reconstruction", "kl_prior", "log_evidence", "log_evidence_se",
          "evidence_gap", "evidence_gap_se")


def test_two_site_pair_shapes_and_values():
    x = torch.randn(25, 3)
    d = evaluate(two_site_model, two_site_guide, x, num_samples=64, batch_size=10,
                 rows_per_chunk=100)
    for name in FIELDS:
        value = getattr(d, name)
        assert value.shape == (25,), name
        assert torch.isfinite(value).all(), name
    assert set(d.kl_sites) == {"s", "z"}
    assert d.kl_per_dim["z"].shape == (25, 3)
    assert d.kl_per_dim["s"].shape == (25, 1)
    assert d.kl_method == {"s": "monte-carlo", "z": "analytic"}
    torch.testing.assert_close(d.kl_prior, d.kl_sites["s"] + d.kl_sites["z"])
    summary = d.summary()
    assert summary["num_data"] == 25 and summary["num_samples"] == 64
    assert summary["kl_sites"]["s"]["method"] == "monte-carlo"
    assert len(summary["kl_per_dim"]["z"]) == 3


def test_data_plate_at_another_dim_with_nested_plate():
    x = torch.randn(12, 5) + 1.0
    d = evaluate(plated_features_model, plated_features_guide, x, num_samples=2000)
    # Exact: z ~ N(0,1), x_j | z ~ N(z, 1) => x ~ N(0, I + 11^T).
    cov = torch.eye(5, dtype=torch.float64) + 1.0
    exact = torch.distributions.MultivariateNormal(torch.zeros(5, dtype=torch.float64), cov)
    truth = exact.log_prob(x.double())
    assert (abs(d.log_evidence - truth) < 4 * d.log_evidence_se + 1e-3).all()
    assert d.kl_per_dim["z"].shape == (12, 1)


def test_guide_missing_a_latent_site_is_named():
    def guide(x):
        pass

    with pytest.raises(ConventionError, match="'s', 'z'|\\['s', 'z'\\]"):
        evaluate(two_site_model, guide, torch.randn(4, 3), num_samples=2)


def test_a_data_plate_named_otherwise_is_found_and_a_wrong_name_explained():
    import pyro
    import pyro.distributions as dist

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("rows", x.shape[0]):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    d = evaluate(model, guide, torch.randn(4), num_samples=2)
    assert d.unit == "data set" and d.total.num_data == 4
    with pytest.raises(ConventionError, match="data_plate='data': no observed site .* "
                                              "\\['rows'\\]"):
        evaluate(model, guide, torch.randn(4), num_samples=2, data_plate="data")


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="num_samples"):
        evaluate(two_site_model, two_site_guide, torch.randn(4, 3), num_samples=0)
    with pytest.raises(ConfigError, match="empty"):
        evaluate(two_site_model, two_site_guide, torch.randn(0, 3), num_samples=2)


def test_importance_stats_against_direct_formulas():
    g = torch.Generator().manual_seed(1)
    log_w = torch.randn(500, 7, generator=g, dtype=torch.float64) * 2 - 50
    e = log_w + 0.3 * torch.randn(500, 7, generator=g, dtype=torch.float64)
    stats = importance_stats(log_w, e)
    w = log_w.exp()
    k = w.shape[0]
    torch.testing.assert_close(stats["log_evidence"], w.mean(0).log())
    torch.testing.assert_close(stats["log_evidence_se"], w.std(0) / w.mean(0) / math.sqrt(k))
    torch.testing.assert_close(stats["elbo_se"], e.std(0) / math.sqrt(k))
    cov = ((w - w.mean(0)) * (e - e.mean(0))).sum(0) / (k - 1)
    var = (w.var(0) / w.mean(0) ** 2 + e.var(0) - 2 * cov / w.mean(0)) / k
    torch.testing.assert_close(stats["evidence_gap_se"], var.sqrt())


def test_constant_weights_have_zero_standard_error():
    log_w = torch.full((10, 3), -4.0, dtype=torch.float64)
    stats = importance_stats(log_w, log_w)
    torch.testing.assert_close(stats["log_evidence"], log_w[0])
    assert (stats["log_evidence_se"] == 0).all() and (stats["evidence_gap_se"] == 0).all()


def test_chunking_over_particles_does_not_change_deterministic_parts():
    x = torch.randn(9, 3)
    a = evaluate(two_site_model, two_site_guide, x, num_samples=30, rows_per_chunk=9)
    b = evaluate(two_site_model, two_site_guide, x, num_samples=30, batch_size=4)
    torch.testing.assert_close(a.kl_sites["z"], b.kl_sites["z"])
    assert a.num_samples == b.num_samples == 30


def test_errors_in_the_users_code_name_its_file_and_line_and_who_is_at_fault():
    import pyro
    import pyro.distributions as dist

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            1 / 0  # noqa: B018 - the user's bug

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))

    with pytest.raises(ConventionError, match=r"test_diagnostics.py:\d+: ZeroDivisionError.*"
                                              "fails on its own too.*the model's"):
        evaluate(model, guide, torch.randn(4, 3), num_samples=2)

    def no_event(x):  # the observed site forgets .to_event(1)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z[..., :1].expand(x.shape), 1.0), obs=x)

    with pytest.raises(ConventionError, match="Shape mismatch.*the fault is the model's; event "
                                              "dimensions of a site go in .to_event"):
        evaluate(no_event, guide, torch.randn(4, 3), num_samples=2)

    def capital_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("s", dist.LogNormal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("Z", dist.Normal(x.new_zeros(x.shape[0], 3), 1.0).to_event(1))

    with pytest.raises(ConventionError, match=r"\['z'\] \(it samples \['Z'\] instead\)"):
        evaluate(two_site_model, capital_guide, torch.randn(4, 3), num_samples=2)
