"""Programs that subsample inside (Pyro's minibatch idiom) are diagnosed on their full plates.

Written as Pyro's SVI tutorials write minibatches: ``with pyro.plate("data", len(x),
subsample_size=m) as ind`` indexing ``x[ind]``, the sequential ``for i in pyro.plate(...)``,
``pyro.subsample(x, event_dim=0)``, a guide with a parameter per point indexed by the plate, and
a subsampled plate over features rather than points.  Each is checked against the exact
evidence of the whole data.  The Gaussian model: mu ~ N(0, 1), x_n ~ N(mu, 1), so that
x ~ N(0, I + 11^T) and mu | x ~ N(sum x / (N + 1), 1 / (N + 1)).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from elbogap import ConventionError, annealed_evidence, evaluate, fit
from elbogap.data.dataset import Dataset
from elbogap.foundations.program_data import ProgramData
from elbogap.training.options import FitOptions

N, M = 40, 10


def data(n=N):
    return torch.randn(n, generator=torch.Generator().manual_seed(3)) + 0.7


def exact_evidence(x):
    n = x.shape[0]
    cov = torch.eye(n, dtype=torch.float64) + 1.0
    return float(dist.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov)
                 .log_prob(x.double()))


def posterior_guide(x_full):
    """q(mu) = the exact posterior of mu given every point."""
    n = x_full.shape[0]
    loc, scale = float(x_full.sum()) / (n + 1), (1.0 / (n + 1)) ** 0.5

    def guide(x):
        pyro.sample("mu", dist.Normal(loc, scale))
    return guide


def plate_indexing_x(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x), subsample_size=M) as ind:
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x[ind])


def sequential_plate(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    for i in pyro.plate("data", len(x), subsample_size=M):
        pyro.sample(f"obs_{i}", dist.Normal(mu, 1.0), obs=x[i])


def pyro_subsample(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x), subsample_size=M):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=pyro.subsample(x, event_dim=0))


def local_latents(x):
    """z_n ~ N(0, 1), x_n ~ N(z_n, 1), M of the N points per run."""
    with pyro.plate("data", len(x), subsample_size=M) as ind:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z, 1.0), obs=x[ind])


@pytest.mark.parametrize("model", [plate_indexing_x, sequential_plate, pyro_subsample],
                         ids=["plate-indices", "sequential", "pyro.subsample"])
def test_a_subsampling_program_is_evaluated_on_all_of_its_data(model):
    """With q the exact posterior every weight is p(x) of all N points: a subsample of M would
    miss it by tens of nats (and IS above the exact value was seen before widening)."""
    x = data()
    d = evaluate(model, posterior_guide(x), x, num_samples=200)
    exact = exact_evidence(x)
    assert abs(d.total.log_evidence - exact) < 1e-3
    assert abs(d.total.elbo - exact) < 1e-3
    assert any("subsamples 10 of 40" in note for note in d.notes)


def test_annealing_covers_the_full_plate_too():
    x = data(12)
    a = annealed_evidence(plate_indexing_x, posterior_guide(x), x, num_chains=4, num_steps=5)
    assert abs(float(a.log_evidence[0]) - exact_evidence(x)) < 1e-3


def test_local_latents_with_a_parameter_per_point_are_exact_per_point():
    """z_n ~ N(0, 1), x_n ~ N(z_n, 1); q(z_n) = N(loc_n, scale_n) from parameters indexed by
    the plate (as the SVI tutorials write a guide over a subsampled plate), set to the exact
    posterior N(x_n / 2, 1/2): every point's ELBO and log p(x_n) = log N(x_n; 0, 2)."""
    x = data()

    def guide(x):
        loc = pyro.param("loc", x / 2)
        with pyro.plate("data", len(x), subsample_size=M) as ind:
            pyro.sample("z", dist.Normal(loc[ind], 0.5 ** 0.5))

    d = evaluate(local_latents, guide, x, num_samples=50)
    exact = dist.Normal(0.0, 2.0 ** 0.5).log_prob(x)
    assert d.unit != "data set" and d.elbo.shape == (N,)
    assert torch.allclose(d.log_evidence.float(), exact, atol=1e-4)
    assert torch.allclose(d.elbo.float(), exact, atol=1e-4)


def test_a_subsampled_plate_of_features_is_widened_too():
    """w_d ~ N(0, 1) per feature, x_nd ~ N(w_d, 1), a plate over D features that scores M of
    them per run: the evidence is of every feature (independent columns, each N(0, I + 11^T))."""
    x = torch.randn(15, 6, generator=torch.Generator().manual_seed(1))

    def model(x):
        with pyro.plate("features", x.shape[1], subsample_size=2, dim=-1) as f:
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            with pyro.plate("data", x.shape[0], dim=-2):
                pyro.sample("obs", dist.Normal(w, 1.0), obs=x[:, f])

    def guide(x):
        n = x.shape[0]
        with pyro.plate("features", x.shape[1], subsample_size=2, dim=-1) as f:
            pyro.sample("w", dist.Normal(x[:, f].sum(0) / (n + 1), (1.0 / (n + 1)) ** 0.5))

    d = evaluate(model, guide, x, num_samples=20)
    exact = sum(exact_evidence(x[:, j]) for j in range(6))
    assert abs(d.total.log_evidence - exact) < 2e-3
    assert any("'features' subsamples 2 of 6" in note for note in d.notes)


def test_a_program_that_cannot_run_at_its_full_size_is_refused_with_the_reason():
    """A guide whose parameter has M entries, one per subsampled point: no full-size program."""
    x = data()

    def guide(x):
        loc = pyro.param("loc", torch.zeros(M))
        with pyro.plate("data", len(x), subsample_size=M):
            pyro.sample("z", dist.Normal(loc, 1.0))

    with pytest.raises(ConventionError, match="plate\\(s\\) 'data' \\(10 of 40\\) subsample.*"
                                              "cannot: the guide failed"):
        evaluate(local_latents, guide, x, num_samples=5)


def test_observations_not_picked_by_the_plate_are_refused():
    """The plate subsamples one point but the model picks its observation itself: at full size
    the plate would score one value N times."""
    x = data()

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x), subsample_size=1):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x[torch.randint(len(x), (1,))])

    with pytest.raises(ConventionError, match="observed site 'obs' holds 1 value\\(s\\) along "
                                              "plate 'data' at its full size 40"):
        evaluate(model, posterior_guide(x), x, num_samples=5)


def test_fitting_keeps_the_programs_own_subsampling():
    """SVI steps on M points scaled by N / M, as Pyro's idiom means; the diagnostics after each
    epoch are of all the training points."""
    x = data()

    def guide(x):
        loc = pyro.param("mu_loc", torch.tensor(0.0))
        pyro.sample("mu", dist.Normal(loc, 0.2))

    split = ProgramData.of(x)
    result = fit(plate_indexing_x, guide, Dataset("x", split[:32], split[32:], None, "the "
                                                  "model's"), FitOptions(
        epochs=3, batch_size=M, lr=0.05, eval_samples=20, progress=False))
    assert result.plan.layout.subsample == M
    assert result.history[-1]["diagnostics"]["num_data"] == 32


def test_batches_whose_layouts_differ_share_the_same_global_draws():
    """A model that broadcasts over particles on full batches but not on the short last one (it
    reads its draw as one number there): the short batch is taken particle by particle and must
    replay the same draws of mu as the others, or the joint weight mixes draws."""
    x = data(10)

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        if len(x) < 4:
            mu = mu.reshape(-1)[0]  # written for one draw at a time
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)

    d = evaluate(model, posterior_guide(x), x, num_samples=30, batch_size=4)
    exact = exact_evidence(x)
    assert abs(d.total.log_evidence - exact) < 1e-3 and abs(d.total.elbo - exact) < 1e-3
