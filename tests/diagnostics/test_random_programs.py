"""evaluate on random Pyro programs it has never seen, against the reference estimator and
Pyro's own Trace_ELBO (``random_programs`` builds them; hypothesis draws them from a fixed
seed: 30 in every run, 60 more in the slow profile).

For every program: the fast path's per-particle terms (one vectorized pass; where the pair does
not broadcast, vmap over the particles, or particle by particle) equal the reference's for the
same draws of z (programs written not to broadcast must get vmap); each
particle's log-weight is minus Pyro's Trace_ELBO loss on those draws (less the guide's observed
sites, which Trace_ELBO counts); evaluate's ELBO agrees with the reference's plain Monte Carlo
ELBO within their errors; AIS from the guide and from the prior and BDMC run to finite numbers
or refuse the pair in one line; and a program that breaks a convention is refused for its
reason.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from elbogap import ConventionError, annealed_evidence, bdmc, evaluate
from elbogap.diagnostics.passes import pass_layout, traced_terms
from elbogap.diagnostics.reference import reference_terms
from elbogap.diagnostics.vmapped_pass import vmapped_terms
from elbogap.foundations.data_plate import program_pair
from elbogap.foundations.module_mode import evaluation_mode
from elbogap.foundations.traces import particle
from tests.diagnostics.random_programs import Site, Spec, build, specs

REFUSALS = {"sequential": "marked for enumeration", "point_mass": "point mass"}
# A particle's terms, fast and plain: float32 sums of a few sites.
RTOL, ATOL = 1e-4, 1e-3
PARTICLES = 3


def check(spec: Spec) -> None:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide, x = build(spec)
    if spec.refusal is not None:
        with pytest.raises(ConventionError, match=REFUSALS[spec.refusal]):
            evaluate(model, guide, x, num_samples=10, data_plate=spec.plate)
        return
    with torch.no_grad(), evaluation_mode(model, guide):
        # The pair as every diagnostic runs it: bound to x, a mixture's state summed out.
        program = program_pair(model, guide, (x,), {}, spec.plate)
        bound = (program.model, program.guide, program.data)
        layout = pass_layout(*bound, spec.plate)
        assert layout.per_datapoint == spec.per_datapoint
        if spec.unbroadcast is not None and spec.mixture:
            # Pyro's enumeration reads ``value.data``, which vmap forbids: the loop, saying so.
            assert layout.vmap is None and "`data` under vmap" in layout.loop_reason, spec
        elif spec.unbroadcast is not None:
            # Pyro's particle plate cannot take it; vmap must.
            assert not layout.vectorized and layout.vmap is not None, (spec, layout.loop_reason)
        if layout.vmap is not None:
            terms, draws, _ = vmapped_terms(*bound, layout, PARTICLES, spec.plate)
            traces = [draws.particle(j) for j in range(PARTICLES)]
        else:
            terms, passes = traced_terms(*bound, layout, PARTICLES, spec.plate)
            traces = ([particle(passes[0][0], j, layout.particle_dim) for j in range(PARTICLES)]
                      if layout.vectorized else [g for g, _ in passes])
        ref = reference_terms(model, guide, x, num_samples=PARTICLES, data_plate=spec.plate,
                              per_datapoint=layout.per_datapoint, guide_traces=traces)
        fast = _rows(terms, layout.per_datapoint)
        for name in ("log_weight", "reconstruction", "log_q", "guide_observed"):
            torch.testing.assert_close(fast[name], getattr(ref, name), rtol=RTOL, atol=ATOL,
                                       msg=lambda m, name=name: f"{name}: {m}\n{spec}")
        if not spec.scaled:
            # Trace_ELBO scores the guide's observed sites as part of log q: less them.  A
            # mixture's state is summed out by TraceEnum_ELBO's own contraction.
            elbo = TraceEnum_ELBO(max_plate_nesting=1) if spec.mixture else Trace_ELBO()
            for j, trace in enumerate(traces):
                pyros = -elbo.loss(model, poutine.replay(guide, trace=trace), x)
                ours = (ref.log_weight[j] - ref.guide_observed[j]).sum().item()
                assert math.isclose(pyros, ours, rel_tol=RTOL, abs_tol=ATOL), spec
    anneal_or_refuse(model, guide, x, spec)
    d = evaluate(model, guide, x, num_samples=200, data_plate=spec.plate)
    with evaluation_mode(model, guide):  # as evaluate has them (its notes say so)
        plain = reference_terms(model, guide, x, num_samples=200, data_plate=spec.plate,
                                per_datapoint=spec.per_datapoint)
    totals = plain.log_weight.sum(1)
    plain_se = totals.std().item() / math.sqrt(len(totals))
    assert abs(d.total.elbo - totals.mean().item()) < 4.5 * math.hypot(d.total.elbo_se, plain_se) \
        + 1e-6, spec


TINY_ANNEALING = {"num_chains": 3, "num_steps": 3, "leapfrog_steps": 2, "seed": 0}


def anneal_or_refuse(model, guide, x, spec: Spec) -> None:
    """AIS from the guide and from the prior and BDMC each give finite numbers, or refuse the
    pair in one line naming what it cannot take: nothing escapes from inside."""
    runs = [lambda start=start: annealed_evidence(model, guide, x, start=start,
                                                  data_plate=spec.plate,
                                                  **TINY_ANNEALING).log_evidence
            for start in ("guide", "prior")]
    runs.append(lambda: bdmc(model, guide, x, data_plate=spec.plate, data_sets=2,
                             **TINY_ANNEALING).lower)
    for run in runs:
        try:
            value = run()
        except ConventionError as e:
            assert "\n" not in str(e).strip() and "'" in str(e), (spec, str(e))
            continue
        assert torch.isfinite(value).all(), spec


def _rows(terms, per_datapoint: bool) -> dict[str, torch.Tensor]:
    """The fast path's terms per particle and row, as the reference has them."""
    if per_datapoint:
        return {"log_weight": terms.log_weight, "reconstruction": terms.reconstruction,
                "log_q": terms.log_q, "guide_observed": terms.guide_observed}
    return {
        "log_weight": (terms.global_log_weight + terms.log_weight.sum(1)).unsqueeze(1),
        "reconstruction": (terms.global_reconstruction + terms.reconstruction.sum(1)).unsqueeze(1),
        "log_q": (terms.global_log_q + terms.log_q.sum(1)).unsqueeze(1),
        "guide_observed": (terms.global_guide_observed + terms.guide_observed.sum(1)).unsqueeze(1),
    }


QUICK = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck))


# Mixtures checked against TraceEnum_ELBO on every run (the quick draws may hold none unscaled).
MIXTURES = [
    Spec(n=4, d=3, plate="rows", sites=(Site("z0", "normal", False, False),
                                        Site("z1", "gamma", True, True)),
         reversed_guide=False, model_factor=True, guide_factor=False, guide_observed=True,
         masked=True, obs_masked=False, deterministic=True, scaled=False, decoder="linear",
         mixture=True, refusal=None),
    Spec(n=3, d=3, plate="documents", sites=(Site("z0", "beta", True, False),),
         reversed_guide=False, model_factor=False, guide_factor=True, guide_observed=False,
         masked=False, obs_masked=False, deterministic=False, scaled=False, decoder="dropout",
         mixture=True, refusal=None),
]


@QUICK
@example(spec=MIXTURES[0])
@example(spec=MIXTURES[1])
@given(spec=specs())
def test_random_programs_agree_with_the_reference_and_pyro(spec):
    check(spec)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(spec=specs())
def test_many_more_random_programs(spec):
    check(spec)
