"""Every estimator on the program classes of ``program_classes``, against each one's exact
log p(x): importance sampling (or, for exchangeable components, the mode-averaged estimate),
AIS from the guide and from the prior run to a finite number, and BDMC's bracket on data it
simulates
(upper >= exact - 4 SE, lower <= exact + 4 SE, SEs over independent points or data sets).  A
pair an estimator cannot take is refused in one line; nothing else may escape from inside."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from elbogap import ConventionError, annealed_evidence, bdmc, evaluate
from tests.diagnostics.program_classes import FORMS, ClassSpec, build_class, class_specs

# Short: what is checked against the exact values is BDMC's bracket, whose SE is over
# independent points or data sets, not over chains.
ANNEALING = {"num_chains": 8, "num_steps": 15, "leapfrog_steps": 3, "seed": 0}


def refused_in_one_line(error: ConventionError) -> None:
    assert "\n" not in str(error).strip() and "'" in str(error), str(error)


def check_class(spec: ClassSpec) -> None:
    program = build_class(spec)
    exact = program.exact(program.observed)
    d = evaluate(program.model, program.guide, program.x, num_samples=300)
    if program.per_datapoint:
        assert torch.allclose(d.log_evidence, exact, atol=1e-4), spec
    else:
        t = d.total
        assert (d.mirror_modes is not None) == program.symmetric, (spec, d.notes)
        if program.symmetric:
            averaged = d.mirror_modes["mode_averaged"]
            assert abs(averaged["log_evidence"] - float(exact)) \
                < 4 * averaged["log_evidence_se"] + 0.02, spec
        elif t.khat < 0.7:
            assert abs(t.log_evidence - float(exact)) < 4 * t.log_evidence_se + 0.01, spec
    for start in ("guide", "prior"):
        try:
            a = annealed_evidence(program.model, program.guide, program.x, start=start,
                                  **ANNEALING)
        except ConventionError as e:
            refused_in_one_line(e)
            continue
        assert torch.isfinite(a.log_evidence).all(), spec
    try:
        b = bdmc(program.model, program.guide, program.x, data_sets=4, **ANNEALING)
    except ConventionError as e:
        refused_in_one_line(e)
        return
    simulated = program.exact(b.observations)
    for bound, sign in ((b.upper, 1), (b.lower, -1)):
        miss = sign * (bound.double() - simulated)  # >= 0 in expectation
        assert miss.mean() >= -4 * miss.std() / math.sqrt(len(miss)), (spec, bound, simulated)
    assert b.summary()["check"] != "failed", spec


# The covariance model is annealed with vmap over its chains (torch.mm does not broadcast).
EVERY_FORM = [pytest.param(ClassSpec(kind, form, 4, 1), id=f"{kind}-{form}",
                           marks=[pytest.mark.slow] if kind == "covariance" else [])
              for kind, forms in FORMS.items() for form in forms]


@pytest.mark.parametrize("spec", EVERY_FORM)
def test_every_class_and_form_against_its_exact_evidence(spec):
    check_class(spec)


@pytest.mark.slow
@settings(max_examples=6, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(spec=class_specs())
def test_random_programs_of_each_class(spec):
    check_class(spec)
