"""Where the gap comes from: approximation gap and amortization gap (Cremer, Li & Duvenaud 2018).

    log p(x) - ELBO[q_encoder]  =  [log p(x) - ELBO[q*]]   +   [ELBO[q*] - ELBO[q_encoder]]
                                    approximation gap            amortization gap

q* is the best guide of the same family fitted to each data point on its own (a local guide,
optimized here with SVI from the encoder's output).  The approximation gap is what the family
cannot do; the amortization gap is what sharing one encoder across all points costs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch.distributions import Independent, MultivariateNormal, Normal

from ..foundations.conventions import inspect_pair
from ..foundations.data_plate import takes_program_arguments
from ..foundations.distributed import SINGLE, Distributed, over_point_groups
from ..foundations.errors import ConventionError
from ..foundations.minimize import minimize, restored
from ..foundations.program_data import ProgramData
from ..foundations.statistics import mean_and_se
from ..foundations.traces import sample_sites, trace_pair
from .evaluation import evaluate
from .local_guide import LocalMeanFieldGuide, LocalSite
from .results import Diagnostics, concatenate

# Points whose local guides are fitted together, on one seed: the split does not depend on how
# many processes share the points.  25: on the digits VAE, 50 points in groups of 25 cost what
# one group of 50 does (1.9 s against 2.3 s), in groups of 10 twice as much.
GROUP_SIZE = 25
FINETUNE_LR = 1e-3  # finetuned_gap's step size, also where split_gap falls back to it


class NoLocalFamily(ConventionError):
    """The guide's site is of a family with no per-point q* here (not Normal, not
    MultivariateNormal): ``split_gap`` fine-tunes the guide itself instead."""


def normal_sites(
    model: Callable, guide: Callable, x: torch.Tensor, data_plate: str = "data"
) -> dict[str, dict]:
    """For each latent site of the guide at ``x``: its Normal's loc and scale and its plates
    (and a MultivariateNormal's Cholesky factor, ``scale_tril``, its diagonal the scale).

    The returned dict (keys ``loc``, ``scale``, ``event_ndim``, ``plates``, ``scale_tril``) is
    what a local guide of the same family needs to start at the encoder's output.
    """
    inspect_pair(model, guide, x, data_plate)  # the conventions, with a clear error if broken
    with torch.no_grad():
        guide_trace, _ = trace_pair(model, guide, x)
    out = {}
    for name, site in sample_sites(guide_trace).items():
        fn = site["fn"]
        base = fn
        while isinstance(base, Independent):
            base = base.base_dist
        if not isinstance(base, Normal | MultivariateNormal):
            raise NoLocalFamily(
                f"guide site '{name}' is {type(base).__name__}, not Normal or MultivariateNormal:"
                " the local guide q* of the amortization gap has no member of its family here"
            )
        shape = fn.batch_shape + fn.event_shape
        tril = None
        if isinstance(base, MultivariateNormal):
            tril = base.scale_tril.expand(shape + shape[-1:]).detach().clone()
        out[name] = {
            "scale_tril": tril,
            "loc": base.loc.expand(shape).detach().clone(),
            "scale": (base.scale.expand(shape) if tril is None
                      else tril.diagonal(dim1=-2, dim2=-1)).detach().clone(),
            "event_ndim": len(fn.event_shape),
            "plates": tuple(
                (f.name, f.size, f.dim)
                for f in reversed(site["cond_indep_stack"]) if f.vectorized
            ),
        }
    return out


def fit_local_guide(
    model: Callable,
    local_guide: Callable,
    parameters: Iterable[torch.Tensor],
    x: torch.Tensor,
    *,
    steps: int = 1000,
    lr: float = 0.02,
    num_particles: int = 8,
) -> list[float]:
    """Maximize the ELBO of ``local_guide`` on ``x`` over ``parameters`` only (the model's
    parameters and their .grad are left untouched).  Returns minus the summed ELBO per step."""
    layout = inspect_pair(model, local_guide, x)
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True,
                      max_plate_nesting=layout.max_plate_nesting)
    return minimize(lambda: elbo.differentiable_loss(model, local_guide, x), parameters,
                    steps=steps, lr=lr)


@dataclass
class GapDecomposition:
    """Per-datapoint tensors ``[n]`` in nats, and the two evaluations they came from."""

    log_evidence: torch.Tensor
    elbo_amortized: torch.Tensor
    elbo_local: torch.Tensor
    approximation_gap: torch.Tensor
    amortization_gap: torch.Tensor
    amortized: Diagnostics
    local: Diagnostics | None  # q*'s evaluation (point by point where each had its own q*)
    q_star: str = "the guide's family fitted to each point"

    @classmethod
    def of(cls, amortized: Diagnostics, elbo_local: torch.Tensor, log_evidence: torch.Tensor,
           local: Diagnostics | None = None, **kwargs) -> GapDecomposition:
        """The two gaps from the encoder's evaluation, q*'s ELBO and log p(x), per point."""
        return cls(log_evidence=log_evidence, elbo_amortized=amortized.elbo,
                   elbo_local=elbo_local, approximation_gap=log_evidence - elbo_local,
                   amortization_gap=elbo_local - amortized.elbo, amortized=amortized,
                   local=local, **kwargs)

    @classmethod
    def concatenate(cls, parts: list[GapDecomposition]) -> GapDecomposition:
        """The decompositions of consecutive groups of points, as one."""
        if len(parts) == 1:
            return parts[0]
        num_samples = parts[0].amortized.num_samples
        local = ([p.local for p in parts] if all(p.local is not None for p in parts)
                 else None)
        return cls(*(torch.cat([getattr(p, name) for p in parts]) for name in (
            "log_evidence", "elbo_amortized", "elbo_local", "approximation_gap",
            "amortization_gap")),
            amortized=concatenate([p.amortized for p in parts], num_samples),
            local=None if local is None else concatenate(local, num_samples),
            q_star=parts[0].q_star)

    def summary(self) -> dict:
        return {
            "num_data": int(self.log_evidence.shape[0]),
            "num_samples": self.amortized.num_samples,
            "q_star": self.q_star,
            "log_evidence": mean_and_se(self.log_evidence),
            "elbo_amortized": mean_and_se(self.elbo_amortized),
            "elbo_local": mean_and_se(self.elbo_local),
            "approximation_gap": mean_and_se(self.approximation_gap),
            "amortization_gap": mean_and_se(self.amortization_gap),
        }


@takes_program_arguments
def decompose_gap(
    model: Callable,
    guide: Callable,
    x: ProgramData,
    *,
    local_guide: Callable,
    num_samples: int = 1000,
    data_plate: str | None = None,
    log_evidence: torch.Tensor | None = None,
) -> GapDecomposition:
    """Split the evidence gap of ``guide`` on its data using a fitted ``local_guide`` (q*,
    called with the same arguments).

    log p(x) is the importance-sampling estimate with q* as proposal (closer to the posterior
    than the encoder, it is the better proposal of the two), unless ``log_evidence`` gives it
    (annealed importance sampling's, as Cremer et al. 2018 did).
    """
    amortized = evaluate(model, guide, x, num_samples=num_samples, data_plate=data_plate)
    local = evaluate(model, local_guide, x, num_samples=num_samples, data_plate=data_plate)
    if log_evidence is None:
        log_evidence = local.log_evidence
    return GapDecomposition.of(amortized, local.elbo, log_evidence, local)


@takes_program_arguments
def split_gap(model: Callable, guide: Callable, x: ProgramData, *, steps: int = 500,
              num_samples: int = 1000, data_plate: str | None = None,
              log_evidence: torch.Tensor | None = None, seed: int | None = None,
              distributed: Distributed = SINGLE, group_size: int = GROUP_SIZE
              ) -> GapDecomposition:
    """``decompose_gap`` with q* built and fitted here: per point and latent site a Normal, or a
    full-covariance Normal where the guide's site is one, started from the guide's own
    (``normal_sites``).  A guide of another family (a flow) gets ``finetuned_gap`` instead.

    The points are fitted and evaluated in groups of ``group_size``, each on its own seed
    (from ``seed``; default: drawn from torch's stream), dealt to the torchrun ranks in turn
    (``distributed``): the numbers do not depend on how many processes share them."""
    return _in_groups(lambda xs, evidence: _split_gap(
        model, guide, xs, steps, num_samples, data_plate, evidence),
        x, log_evidence, seed, "split_gap", distributed, group_size)


def _in_groups(decompose: Callable, x: ProgramData, log_evidence: torch.Tensor | None,
               seed: int | None, stream: str, distributed: Distributed,
               group_size: int) -> GapDecomposition:
    """``decompose(points, their log_evidence)`` on groups of points (``over_point_groups``),
    as one decomposition."""
    seed = distributed.common_seed(seed)

    def group(start: int, stop: int) -> GapDecomposition:
        return decompose(x[start:stop],
                         None if log_evidence is None else log_evidence[start:stop])

    return GapDecomposition.concatenate(over_point_groups(
        group, x.shape[0], group_size, seed, stream, distributed, x.device))


def _split_gap(model: Callable, guide: Callable, x: ProgramData, steps: int, num_samples: int,
               data_plate: str | None, log_evidence: torch.Tensor | None) -> GapDecomposition:
    try:
        sites = {n: LocalSite(**v) for n, v in normal_sites(model, guide, x, data_plate).items()}
    except NoLocalFamily:
        return _finetuned_gap(model, guide, x, steps, num_samples, data_plate, FINETUNE_LR,
                              log_evidence)
    local = LocalMeanFieldGuide(sites)
    fit_local_guide(model, local.guide, local.parameters(), x, steps=steps)
    gaps = decompose_gap(model, guide, x, local_guide=local.guide, num_samples=num_samples,
                         data_plate=data_plate, log_evidence=log_evidence)
    full = any(site.scale_tril is not None for site in sites.values())
    gaps.q_star = f"a {'full-covariance' if full else 'mean-field'} Normal fitted to each point"
    return gaps


@takes_program_arguments
def finetuned_gap(model: Callable, guide: Callable, x: ProgramData, *, steps: int = 500,
                  num_samples: int = 1000, data_plate: str | None = None,
                  lr: float = FINETUNE_LR,
                  log_evidence: torch.Tensor | None = None, seed: int | None = None,
                  distributed: Distributed = SINGLE, group_size: int = GROUP_SIZE
                  ) -> GapDecomposition:
    """The split for any guide: q*(z | x_n) is the guide itself with every one of its
    parameters fine-tuned by SVI on x_n alone (Cremer et al. 2018 optimize a flow's parameters
    per point the same way), then put back.  One point at a time: ``steps`` SVI steps each;
    groups of points on their own seeds and ranks, as in ``split_gap``."""
    return _in_groups(lambda xs, evidence: _finetuned_gap(
        model, guide, xs, steps, num_samples, data_plate, lr, evidence),
        x, log_evidence, seed, "finetuned_gap", distributed, group_size)


def _finetuned_gap(model: Callable, guide: Callable, x: ProgramData, steps: int,
                   num_samples: int, data_plate: str | None, lr: float,
                   log_evidence: torch.Tensor | None) -> GapDecomposition:
    amortized = evaluate(model, guide, x, num_samples=num_samples, data_plate=data_plate)
    per_point = []
    for n in range(x.shape[0]):
        point = x[n: n + 1]
        with poutine.trace(param_only=True) as params:
            guide(point)
        tensors = [site["value"].unconstrained() for site in params.trace.nodes.values()]
        with restored(tensors):
            fit_local_guide(model, guide, tensors, point, steps=steps, lr=lr)
            d = evaluate(model, guide, point, num_samples=num_samples, data_plate=data_plate)
        per_point.append(d)
    local = concatenate(per_point, num_samples)
    return GapDecomposition.of(
        amortized, local.elbo, local.log_evidence if log_evidence is None else log_evidence,
        local,
        q_star="the guide with all its parameters fine-tuned on each point")
