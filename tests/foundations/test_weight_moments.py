"""Weights reduced as they come give what the plain definitions give on the whole array, and
evaluation's memory stays bounded in K."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import arviz
import numpy as np
import pytest
import torch

from elbogap.foundations.psis import importance_ess
from elbogap.foundations.statistics import importance_stats
from elbogap.foundations.weight_moments import MIN_SAMPLES_CONTROL_VARIATE, WeightMoments


def with_control_variate(e: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """The plain definition: e_k - gamma c_k, gamma by least squares over the K draws."""
    if e.shape[0] < MIN_SAMPLES_CONTROL_VARIATE:
        return e
    c = e - log_w
    cc = c - c.mean(0)
    gamma = ((e - e.mean(0)) * cc).sum(0) / cc.pow(2).sum(0)
    return e - gamma * c


def arviz_khat(log_w: torch.Tensor) -> np.ndarray:
    return np.asarray(arviz.psislw(log_w.T.numpy().copy(), reff=1.0)[1])


@pytest.mark.parametrize("k, chunk", [(1000, 137), (5000, 5000), (60, 1), (30, 7)])
def test_chunked_sums_equal_the_plain_definitions_on_the_whole_array(k, chunk):
    torch.manual_seed(k)
    scales = torch.tensor([1e-7, 1.0, 3.0, 10.0])
    log_w = torch.randn(k, 4, dtype=torch.float64) * scales - 250.0
    # Heavier tails in one row: a Student-t of 2 degrees of freedom.
    log_w[:, 3] = torch.distributions.StudentT(2.0).sample((k,)).double() * 3 - 250
    e = log_w + 0.3 * torch.randn(k, 4, dtype=torch.float64)
    r = torch.randn(k, 4, dtype=torch.float64) - 80
    moments = WeightMoments(k)
    for s in range(0, k, chunk):
        moments.add(log_w[s:s + chunk], e[s:s + chunk], r[s:s + chunk])
    e_cv = with_control_variate(e, log_w)
    plain = importance_stats(log_w, e_cv)
    elbo = moments.elbo()
    tol = {"rtol": 1e-9, "atol": 1e-7}  # nats: float64 rounding of sums of squares
    torch.testing.assert_close(moments.log_mean_exp(), plain["log_evidence"], **tol)
    torch.testing.assert_close(moments.log_mean_exp_se(), plain["log_evidence_se"], **tol)
    torch.testing.assert_close(elbo["elbo"], e_cv.mean(0), **tol)
    torch.testing.assert_close(elbo["elbo_se"], plain["elbo_se"], **tol)
    torch.testing.assert_close(elbo["evidence_gap_se"], plain["evidence_gap_se"], **tol)
    torch.testing.assert_close(moments.ess(), importance_ess(log_w), rtol=1e-9, atol=1e-9)
    mean, se = moments.reconstruction()
    torch.testing.assert_close(mean, r.mean(0), **tol)
    torch.testing.assert_close(se, r.std(0) / math.sqrt(k), **tol)
    # PSIS from the running tail: ArviZ's own k-hat on the whole array, to the last digit.
    np.testing.assert_array_equal(moments.khat().numpy()[1:], arviz_khat(log_w)[1:])
    # Weights constant to the rounding of float32 log-densities have no tail to fit.
    assert moments.khat()[0] == -math.inf


def test_rows_without_a_finite_weight_and_too_few_draws():
    log_w = torch.tensor([[-math.inf, 0.0], [-math.inf, 1.0]], dtype=torch.float64)
    moments = WeightMoments(2)
    moments.add(log_w[:1])
    moments.add(log_w[1:])
    assert moments.log_mean_exp()[0] == -math.inf
    assert moments.log_mean_exp()[1] == pytest.approx(math.log((1 + math.e) / 2))
    assert torch.isnan(moments.khat()).all()  # k-hat needs 25 draws
    single = WeightMoments(1)
    single.add(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3))
    assert torch.isnan(single.log_mean_exp_se()).all()
    assert torch.isnan(single.elbo()["elbo_se"]).all()


PEAK = """
import json, sys, torch, pyro
import pyro.distributions as dist
from elbogap import evaluate

def model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        loc = z.sum(-1, keepdim=True).expand(z.shape[:-1] + (3,))
        pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

def guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.full((2,), 0.1), 0.8).to_event(1))

def peak_mib(k):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    evaluate(model, guide, torch.ones(1, 3), num_samples=k)
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmHWM"].split()[0]) / 1024

evaluate(model, guide, torch.ones(1, 3), num_samples=2000)  # set-up, first calls
print(json.dumps({k: peak_mib(k) for k in map(int, sys.argv[1:])}))
"""


@pytest.mark.slow
def test_evaluation_memory_is_bounded_in_k():
    """One point at K = 10^6 peaks no higher than at K = 10^4, within a few MiB: the
    particles are reduced chunk by chunk (earlier, every draw's log-weight and ELBO terms were
    kept until the end, ~90 bytes each, ~90 MB more here)."""
    result = subprocess.run([sys.executable, "-c", PEAK, "10000", "1000000"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    assert peaks["1000000"] - peaks["10000"] < 16, peaks
