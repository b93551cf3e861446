"""Fitting a parametric p_theta to a target q by either direction of the KL divergence.

* Reverse KL, D(p_theta || q) = E_{x~p_theta}[log p_theta(x) - log q(x)]: the samples come from
  the distribution being optimized.  Mode-seeking: it is what the ELBO minimizes.  Gradient

      grad D = E_{x~p_theta}[ grad log p_theta(x) * (1 + log p_theta(x) - log q(x)) ],

  estimated two ways: the **score-function** (REINFORCE) estimator, which needs only log_prob
  and sample (no reparameterization; as in reinforcement learning, the sampling distribution is
  the one being optimized), optionally with a leave-one-out baseline; and the **pathwise**
  (reparameterized) estimator x = loc + scale * eps, the one the ELBO uses.
* Forward KL, D(q || p_theta) = E_{x~q}[log q(x) - log p_theta(x)]: samples from the fixed
  target, gradient -E_{x~q}[grad log p_theta(x)]: maximum likelihood.  Mass-covering.

Each estimator is a surrogate loss whose autograd gradient is the estimate, so any torch
optimizer descends the divergence.  Families and targets are Pyro distributions; a target needs
only ``log_prob`` and ``sample``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro.distributions as dist
import torch
from torch import nn

from ..foundations.errors import ConfigError
from ..foundations.minimize import minimize

ESTIMATORS = ("score-function", "pathwise")
DIRECTIONS = ("reverse", "forward")
BASELINES = (None, "leave-one-out")


class DiagonalGaussian(nn.Module):
    """p_theta(x) = Normal(x; loc, diag(scale^2)), theta = (loc, log scale)."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.loc = nn.Parameter(torch.as_tensor(loc, dtype=torch.get_default_dtype()).clone())
        self.log_scale = nn.Parameter(torch.as_tensor(scale).log().clone())

    def distribution(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.log_scale.exp()).to_event(1)


class GaussianMixture(nn.Module):
    """p_theta(x) = sum_c softmax(w)_c Normal(x; loc_c, diag(scale_c^2)).

    A mixture cannot be reparameterized (the component choice is discrete), so it is fitted
    with the score-function estimator or by maximum likelihood only.
    """

    def __init__(self, locs: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(locs.shape[0]))
        self.locs = nn.Parameter(locs.clone().to(torch.get_default_dtype()))
        self.log_scales = nn.Parameter(scales.log().clone())

    def distribution(self) -> dist.Distribution:
        components = dist.Normal(self.locs, self.log_scales.exp()).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), components)


def reverse_kl_score_function_loss(
    family: nn.Module, target: dist.Distribution, num_samples: int, baseline: str | None = None
) -> torch.Tensor:
    """Surrogate whose gradient is the score-function estimate of grad D(p_theta || q).

    With ``baseline="leave-one-out"`` each draw's factor (1 + log p - log q) has the mean of the
    other draws' factors subtracted; that baseline does not depend on the draw itself, so the
    estimator stays unbiased.
    """
    if baseline not in BASELINES:
        raise ConfigError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    p = family.distribution()
    with torch.no_grad():
        x = p.sample((num_samples,))
    log_p = p.log_prob(x)
    factor = (1 + log_p - target.log_prob(x)).detach()
    if baseline == "leave-one-out":
        if num_samples < 2:
            raise ConfigError("the leave-one-out baseline needs num_samples >= 2")
        factor = factor - (factor.sum() - factor) / (num_samples - 1)
    return (log_p * factor).mean()


def reverse_kl_pathwise_loss(
    family: nn.Module, target: dist.Distribution, num_samples: int
) -> torch.Tensor:
    """Monte Carlo D(p_theta || q) with reparameterized draws: its gradient is the pathwise one."""
    p = family.distribution()
    if not p.has_rsample:
        raise ConfigError(
            f"{type(p).__name__} cannot be reparameterized: use the score-function estimator"
        )
    x = p.rsample((num_samples,))
    return (p.log_prob(x) - target.log_prob(x)).mean()


def forward_kl_loss(family: nn.Module, target: dist.Distribution, num_samples: int) -> torch.Tensor:
    """-mean log p_theta(x), x ~ q: D(q || p_theta) up to the constant E_q[log q]."""
    with torch.no_grad():
        x = target.sample((num_samples,))
    return -family.distribution().log_prob(x).mean()


def surrogate_loss(
    direction: str, estimator: str = "pathwise", baseline: str | None = None
) -> Callable[[nn.Module, dist.Distribution, int], torch.Tensor]:
    if direction not in DIRECTIONS:
        raise ConfigError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if direction == "forward":
        return forward_kl_loss
    if estimator not in ESTIMATORS:
        raise ConfigError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "pathwise":
        return reverse_kl_pathwise_loss
    return lambda family, target, n: reverse_kl_score_function_loss(family, target, n, baseline)


def fit_kl(
    family: nn.Module,
    target: dist.Distribution,
    direction: str,
    *,
    estimator: str = "pathwise",
    baseline: str | None = None,
    steps: int = 3000,
    lr: float = 0.02,
    num_samples: int = 64,
) -> list[float]:
    """Descend D(p_theta || q) (``reverse``) or D(q || p_theta) (``forward``) with Adam (step
    size decaying tenfold over the run).  Returns the surrogate loss per step."""
    loss_fn = surrogate_loss(direction, estimator, baseline)
    return minimize(lambda: loss_fn(family, target, num_samples), family.parameters(),
                    steps=steps, lr=lr)


@dataclass
class Estimate:
    mean: float
    se: float


def kl_monte_carlo(p: dist.Distribution, q: dist.Distribution, num_samples: int) -> Estimate:
    """D(p || q) = E_p[log p - log q] by Monte Carlo, with its standard error."""
    with torch.no_grad():
        x = p.sample((num_samples,))
        terms = (p.log_prob(x) - q.log_prob(x)).double()
    return Estimate(terms.mean().item(), terms.std().item() / math.sqrt(num_samples))


def kl_quadrature(
    p: dist.Distribution, q: dist.Distribution, lo: float, hi: float, points: int = 200_001
) -> float:
    """D(p || q) for 1-D densities by the trapezoid rule on [lo, hi] (both must vanish outside)."""
    with torch.no_grad():
        grid = torch.linspace(lo, hi, points, dtype=torch.float64).unsqueeze(-1)
        log_p = p.log_prob(grid.to(torch.get_default_dtype())).double()
        log_q = q.log_prob(grid.to(torch.get_default_dtype())).double()
        integrand = log_p.exp() * (log_p - log_q)
    return torch.trapezoid(integrand, grid.squeeze(-1)).item()


def gradient_samples(
    family: nn.Module, loss_fn: Callable, target: dist.Distribution, num_samples: int,
    replicates: int,
) -> torch.Tensor:
    """``replicates`` independent gradient estimates at the current theta, ``[replicates, P]``."""
    rows = []
    for _ in range(replicates):
        family.zero_grad()
        loss_fn(family, target, num_samples).backward()
        rows.append(torch.cat([p.grad.detach().flatten() for p in family.parameters()]))
    family.zero_grad()
    return torch.stack(rows)


def parameter_names(family: nn.Module) -> list[str]:
    return [f"{name}[{i}]" for name, p in family.named_parameters() for i in range(p.numel())]


def make_target(name: str, separation: float) -> dist.Distribution:
    """bimodal: 1/2 N(-s, 0.5^2) + 1/2 N(s, 0.5^2); gaussian: N(1, 0.7^2)."""
    if name == "gaussian":
        return dist.Normal(torch.tensor([1.0]), torch.tensor([0.7])).to_event(1)
    locs = torch.tensor([[-separation], [separation]])
    return dist.MixtureSameFamily(
        dist.Categorical(probs=torch.tensor([0.5, 0.5])), dist.Normal(locs, 0.5).to_event(1)
    )


def divergences(p: dist.Distribution, target: dist.Distribution, gaussian: bool) -> dict:
    """Both directions: Monte Carlo (mean, se), quadrature, and closed form where one exists."""
    out = {}
    for name, (a, b) in {"reverse": (p, target), "forward": (target, p)}.items():
        mc = kl_monte_carlo(a, b, 200_000)
        entry = {"monte_carlo": mc.mean, "monte_carlo_se": mc.se,
                 "quadrature": kl_quadrature(a, b, -15.0, 15.0)}
        entry["exact"] = (torch.distributions.kl_divergence(a, b).item() if gaussian else None)
        out[name] = entry
    return out


def gradient_variances(target: dist.Distribution, init_loc: float, init_scale: float,
                        num_samples: int, replicates: int) -> dict:
    """Mean and variance of each estimator of grad D(p_theta || q) at the initial theta."""
    out = {}
    for label, estimator, baseline in (
        ("score-function", "score-function", None),
        ("score-function + leave-one-out baseline", "score-function", "leave-one-out"),
        ("pathwise", "pathwise", None),
    ):
        family = DiagonalGaussian(torch.tensor([init_loc]), torch.tensor([init_scale]))
        grads = gradient_samples(family, surrogate_loss("reverse", estimator, baseline), target,
                                 num_samples, replicates)
        out[label] = {
            name: {"mean": grads[:, i].mean().item(), "variance": grads[:, i].var().item(),
                   "se_of_mean": grads[:, i].std().item() / math.sqrt(replicates)}
            for i, name in enumerate(parameter_names(family))
        }
    return out


def fit_both_directions(target: dist.Distribution, estimator: str, baseline: str | None,
                        init_loc: float, init_scale: float, steps: int, lr: float,
                        num_samples: int) -> dict:
    """A Gaussian fitted to ``target`` by reverse KL (with ``estimator``) and by forward KL
    (maximum likelihood), each from the same start, with both divergences of each fit."""
    fits = {}
    for direction, how in (("reverse", estimator), ("forward", "pathwise")):
        family = DiagonalGaussian(torch.tensor([init_loc]), torch.tensor([init_scale]))
        fit_kl(family, target, direction, estimator=how, baseline=baseline, steps=steps, lr=lr,
               num_samples=num_samples)
        fits[direction] = {"family": family,
                           "estimator": how if direction == "reverse" else "maximum likelihood",
                           "loc": family.loc.item(), "scale": family.log_scale.exp().item()}
    gaussian = not isinstance(target, dist.MixtureSameFamily)
    with torch.no_grad():
        for fit in fits.values():
            fit["divergences"] = divergences(fit["family"].distribution(), target, gaussian)
    return fits
