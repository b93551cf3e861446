"""The optimization step of ``fit``: Pyro's ELBO on a minibatch, minimized by one torch Adam.

This is SVI with ``Trace_ELBO`` (or ``TraceMeanField_ELBO``), the loss and its gradient exactly
as Pyro computes them, with two costs of ``pyro.infer.SVI`` taken out of the hot loop (measured
in ``benchmarks/benchmark.py``):

* ``pyro.optim.Adam`` keeps one torch optimizer per parameter tensor and runs a parameter-capture
  trace every step; a single ``torch.optim.Adam`` over all parameters does the same update.
* Distribution argument and support checks (Pyro's validation) run on the first step only: a
  pair that passes them once has the same shapes and supports on every later minibatch.
* With ``jit`` (the default) later steps replay a recording of the loss's tensor operations
  instead of running the pair's Python (``elbogap.training.compiled_loss``: verified against the eager
  loss first, eager for good if the pair cannot be recorded faithfully).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.ops.jit
import torch
from pyro.infer import (
    JitTrace_ELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)

from ..foundations.distributed import SINGLE, Distributed
from ..foundations.errors import ConventionError
from ..foundations.program_data import ProgramData, as_program_data, bound_program
from ..foundations.rng import rng_preserved
from ..foundations.traces import first_line, trace_pair
from .compiled_loss import CompiledLoss
from .kl_weight import KLWeighted
from .minibatch import ScaleDataPlate
from .objectives import PerDatapointRenyiELBO
from .parameters import pair_parameters
from .vmapped_elbo import ParticlesOfAnyPair


class TraceGraphELBO(TraceGraph_ELBO):
    """Pyro's ``TraceGraph_ELBO`` with the ``differentiable_loss`` of its siblings (Pyro 1.9 gives
    it only ``loss_and_grads``, which calls ``backward`` itself): the value of minus the ELBO,
    the gradient of its Rao-Blackwellized surrogate."""

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs
                            ) -> torch.Tensor:
        elbo, surrogate = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        return -elbo.detach() + (surrogate - surrogate.detach())


ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO, "enum": TraceEnum_ELBO,
         "tracegraph": TraceGraphELBO, "iwae": PerDatapointRenyiELBO}
# Estimators of the ELBO itself (and its gradient); iwae trains another bound.
ELBO_ESTIMATORS = ("trace", "meanfield", "enum", "tracegraph")


class ElboStep:
    """``step(batch) -> loss``: one Adam step on the minibatch ELBO, scaled to ``num_data``.

    Parameters are whatever the pair registers in Pyro's param store (``pyro.param``,
    ``pyro.module``), in unconstrained form; ones that appear later join the optimizer then.
    With ``kl_weighted`` every call takes the weight of the KL term (``elbogap.training.
    kl_weight``); ``clip_norm`` clips the gradients' global norm before Adam's step.
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        num_data: int,
        *,
        lr: float,
        elbo: str = "trace",
        num_particles: int = 1,
        data_plate: str | None = "data",
        distributed: Distributed = SINGLE,
        jit: bool = True,
        max_plate_nesting: int | None = None,
        renyi_alpha: float = 0.0,
        kl_weighted: bool = False,
        broadcasts: bool = True,
        clip_norm: float | None = None,
    ):
        self.scale = ScaleDataPlate(data_plate, num_data)
        # The pair called on its program's arguments (``ProgramData``): one tensor x or many.
        model, guide = bound_program(model), bound_program(guide)
        self.user_model, self.user_guide = model, guide
        self.model = self.scale(model)
        self.guide = self.scale(guide)
        self.kl_weighted = kl_weighted
        if kl_weighted:
            self.model, self.guide = KLWeighted(self.model), KLWeighted(self.guide)
        self.clip_norm = clip_norm
        self.clipped = 0  # steps whose gradient norm was clipped
        self.lr_multiplier = 1.0
        self.distributed = distributed
        particles = {"num_particles": num_particles, "vectorize_particles": num_particles > 1}
        if max_plate_nesting is not None:
            # Enumerated sites need their dimensions left of every plate; particles one more.
            particles["max_plate_nesting"] = max_plate_nesting
        if elbo == "iwae":
            self.loss = PerDatapointRenyiELBO(num_particles, renyi_alpha, data_plate)
        elif num_particles > 1 and not broadcasts:
            self.loss = ParticlesOfAnyPair(
                ELBOS[elbo], num_particles,
                **{k: v for k, v in particles.items() if k == "max_plate_nesting"})
        else:
            self.loss = ELBOS[elbo](**particles)
        # A recording takes tensors: the minibatch's arguments go in as their tensors, put
        # back into the arguments (``self.batch``, whose other values are constants) inside.
        self.batch: ProgramData | None = None
        self.compiled = CompiledLoss(
            self._eager_loss, lambda: _recorded_loss(elbo, particles, self._from_flat(self.model),
                                                     self._from_flat(self.guide))
        )
        if not jit:
            self.compiled.disable("jit is off")
        elif elbo == "enum":
            self.compiled.disable("TraceEnum_ELBO runs eagerly")
        elif elbo == "iwae":
            self.compiled.disable("the per-datapoint importance-weighted bound runs eagerly")
        elif num_particles > 1 and not broadcasts:
            self.compiled.disable("particles of a pair that does not broadcast run eagerly")
        elif elbo == "tracegraph":
            self.compiled.disable("TraceGraph_ELBO runs eagerly")
        elif pyro.settings.get("module_local_params"):
            # Recordings read their parameters from the param store, which then holds none.
            self.compiled.disable("module-local parameters (module_local_params=True) run eagerly")
        self.lr = lr
        self.optimizer: torch.optim.Adam | None = None
        self.names: list[str] = []
        self._pending_state: dict | None = None
        self._validated = False
        self.skipped = 0  # steps whose loss or gradient was not finite, never applied
        self.consecutive_skipped = 0

    def __call__(self, batch: torch.Tensor | ProgramData, global_batch_size: int | None = None,
                 kl_weight: float = 1.0) -> float:
        """One step on ``batch`` (a tensor x, or the program's arguments); returns the loss.
        Under data parallelism ``batch`` is this rank's shard (possibly empty) of a global
        minibatch of ``global_batch_size`` points, and the loss returned is the global
        minibatch's, the same on every rank."""
        batch = as_program_data(batch)
        inputs = self._inputs(batch, kl_weight)
        if self.distributed.enabled:
            self._prepare_distributed(batch, global_batch_size)
        # A plate written without a size takes the minibatch's (a constant of a recording,
        # whose key holds the minibatch's shape).
        self.scale.rows = batch.shape[0]
        loss_value = 0.0
        if batch.shape[0]:
            first = not self._validated
            try:
                if first:
                    # Pyro's checks (when enabled) on a loss that is thrown away: every step,
                    # the first too, is then computed alike, which keeps --resume exact.
                    with rng_preserved(), torch.no_grad():
                        # (TraceEnum_ELBO's differentiable_loss refuses to run without a
                        # graph; its loss runs the same checks.)
                        self.loss.loss(self.model, self.guide, *self._arguments(inputs))
                # The data-plate scale is a constant of a recording: part of its key.
                loss = self.compiled(*inputs, key=self.scale.batch_size)
            except (ValueError, RuntimeError) as e:
                if not first:
                    raise
                # Pyro's checks of the first step name the site; keep its first line only.
                raise ConventionError(f"the first training step failed: {first_line(e)}") from e
            self._validated = True
            self._register_new_parameters()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            loss_value = loss.item()
        else:
            # A rank whose shard of the last global batch is empty contributes zero gradient.
            self.optimizer.zero_grad(set_to_none=True)
        params = self._parameters()
        loss_value = self.distributed.average_gradients(params, loss_value)
        if not (math.isfinite(loss_value) and _gradients_finite(params)):
            # Skipped, not applied: one bad minibatch must not poison the parameters.  After
            # averaging, every rank sees the same verdict.
            self.skipped += 1
            self.consecutive_skipped += 1
            return loss_value
        self.consecutive_skipped = 0
        if self.clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip_norm)
            self.clipped += int(norm > self.clip_norm)
        self.optimizer.step()
        return loss_value

    def set_lr_multiplier(self, multiplier: float) -> None:
        """Every parameter's step size is ``lr × multiplier`` from now on (a schedule's)."""
        self.lr_multiplier = multiplier
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * multiplier

    def eager_loss(self, batch: torch.Tensor | ProgramData, kl_weight: float = 1.0
                   ) -> torch.Tensor:
        """The minibatch loss as the pair computes it, without a step: what a recording is
        checked against."""
        return self._eager_loss(*self._inputs(as_program_data(batch), kl_weight))

    def _inputs(self, batch: ProgramData, kl_weight: float) -> tuple[torch.Tensor, ...]:
        """A call's tensors: the batch's, then the KL weight where it is an input."""
        self.batch = batch
        inputs = batch.flat()
        if self.kl_weighted:
            inputs += (torch.tensor(float(kl_weight), dtype=batch.dtype, device=batch.device),)
        return inputs

    def _arguments(self, inputs: tuple[torch.Tensor, ...]) -> tuple:
        """The tensors of a call back as the pair's arguments: the batch, then any weight."""
        m = len(self.batch.flat())
        return (self.batch.with_flat(inputs[:m]), *inputs[m:])

    def _from_flat(self, fn: Callable) -> Callable:
        return lambda *inputs: fn(*self._arguments(inputs))

    def _eager_loss(self, *inputs: torch.Tensor) -> torch.Tensor:
        with pyro.validation_enabled(False):
            return self.loss.differentiable_loss(self.model, self.guide, *self._arguments(inputs))

    def _prepare_distributed(self, batch: torch.Tensor, global_batch_size: int) -> None:
        if self.optimizer is None:
            # Creating the parameters must not move the random stream.
            with rng_preserved(), torch.no_grad():
                trace_pair(self.user_model, self.user_guide, batch[:1])
            self._register_new_parameters()
            self.distributed.broadcast_parameters(self._parameters())
        self.scale.batch_size = global_batch_size / self.distributed.world_size

    def _parameters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _register_new_parameters(self) -> None:
        store = pair_parameters(self.user_model, self.user_guide)
        if len(store) == len(self.names):
            return
        new = [name for name in store if name not in set(self.names)]
        lr = self.lr * self.lr_multiplier
        if self.optimizer is None:
            self.optimizer = _adam([store[n] for n in new], lr)
        else:
            self.optimizer.add_param_group({"params": [store[n] for n in new], "lr": lr})
        self.names += new
        if self._pending_state is not None and self._pending_state["names"] == self.names:
            self.optimizer.load_state_dict(self._pending_state["adam"])
            self._pending_state = None
            # Adam's saved state holds the step size of the epoch it was saved in.
            self.set_lr_multiplier(self.lr_multiplier)

    def state_dict(self) -> dict | None:
        if self.optimizer is None:
            return None
        return {"names": list(self.names), "adam": self.optimizer.state_dict(),
                "eager_because": self.compiled.reason}

    def load_state_dict(self, state: dict | None) -> None:
        """Adam's moments from a checkpoint, applied once the same parameters are registered."""
        if state is None:
            return
        if state.get("eager_because") is not None:
            # A run that fell back to the eager loss goes on with it after --resume.
            self.compiled.disable(state["eager_because"])
        self._pending_state = state
        if self.optimizer is not None and state["names"] == self.names:
            self.optimizer.load_state_dict(state["adam"])
            self._pending_state = None
            self.set_lr_multiplier(self.lr_multiplier)


def _recorded_loss(elbo: str, particles: dict, model: Callable, guide: Callable) -> Callable:
    """A loss function that records itself on its first call, with Pyro's JIT machinery."""
    if elbo == "meanfield":
        # JitTraceMeanField_ELBO's own loop.  Not that class itself: in Pyro 1.9 it never keeps
        # its recording (it tests for an attribute it does not set) and records anew, with new
        # draws, on every call.  Nor TraceMeanField_ELBO.differentiable_loss, whose value
        # passes through Python floats that a recording would freeze.
        meanfield = TraceMeanField_ELBO(**particles)

        def meanfield_loss(*inputs: torch.Tensor) -> torch.Tensor:
            loss = 0.0
            for model_trace, guide_trace in meanfield._get_traces(model, guide, inputs, {}):
                particle = meanfield._differentiable_loss_particle(model_trace, guide_trace)[1]
                loss = loss + particle / meanfield.num_particles
            return loss

        return pyro.ops.jit.trace(meanfield_loss)
    recorded = JitTrace_ELBO(**particles)

    def loss(*inputs: torch.Tensor) -> torch.Tensor:
        value, surrogate = recorded.loss_and_surrogate_loss(model, guide, *inputs)
        # Not JitTrace_ELBO.differentiable_loss: in Pyro 1.9 it leaves ``value`` attached to
        # the graph, so reparameterized gradients come out twice over.
        return value.detach() + (surrogate - surrogate.detach())

    return loss


def _gradients_finite(params: list[torch.Tensor]) -> bool:
    """One reduction per tensor instead of an elementwise isfinite: NaN and inf propagate
    through a sum.  (A sum can also overflow for gradients near 1e38 / size; skipping such a
    step is no loss.)"""
    sums = [p.grad.sum() for p in params if p.grad is not None]
    return not sums or bool(torch.isfinite(torch.stack(sums).sum()))


def _adam(params: list[torch.Tensor], lr: float) -> torch.optim.Adam:
    """torch's fused Adam where this torch has it for the parameters' device: the same update
    in one kernel per step instead of several elementwise passes per tensor."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, lr=lr)
