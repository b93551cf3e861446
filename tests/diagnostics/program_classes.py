"""Random programs of the classes that need a construction of their own, each with its exact
log p(x) as a function of the data, so that every estimator (importance sampling, AIS from the
guide and from the prior, BDMC both ways) is checked against it on data it simulates too.

* ``subsampled`` — mu ~ N(0, t^2), x_n ~ N(mu, 1) observed through Pyro's minibatch idiom: a
  plate of N subsampling m, indexing x (``indices``), with ``pyro.subsample`` (``subsample``),
  or iterated (``sequential``).  x ~ N(0, I + t^2 11^T).
* ``conditioned`` — w ~ N(0, t^2), y_n ~ N(w f_n, 1), the data given by
  ``pyro.condition(model, data={"y": y})`` rather than ``obs=``.  y ~ N(0, I + t^2 f f^T).
* ``mixture`` — K exchangeable components, locs_k ~ N(0, s^2) in a plate, equal weights, each
  point's assignment summed out; ``distinct`` gives each component its own prior mean (no
  symmetry).  log p(x) by the sum over all K^N assignments.
* ``covariance`` — a scale ~ HalfCauchy(1) and a correlation L ~ LKJCholesky(2, eta) combined
  with ``torch.mm`` (which does not broadcast over particles), x_n ~ N(0, (sL)(sL)^T).
  log p(x) by quadrature over (log s, rho).
* ``guide_discrete`` — k_n ~ Categorical(K), x_n ~ N(locs[k_n], 1), the guide drawing k_n from
  a Categorical of its own.  log p(x_n) by the sum over k.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from hypothesis import strategies as st
from pyro.infer import config_enumerate
from pyro.ops.indexing import Vindex

KINDS = ("subsampled", "conditioned", "mixture", "covariance", "guide_discrete")
FORMS = {"subsampled": ("indices", "subsample", "sequential"), "conditioned": ("condition",),
         "mixture": ("exchangeable", "distinct"), "covariance": ("mm",),
         "guide_discrete": ("amortized",)}


@dataclass(frozen=True)
class ClassSpec:
    kind: str
    form: str
    n: int
    seed: int


@dataclass
class ClassProgram:
    model: Callable
    guide: Callable
    x: torch.Tensor
    # log p of data (the observed sites' values, as BDMC's observations hold them), per point
    # for a pair of local latents, else of the data set.
    exact: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    observed: dict[str, torch.Tensor]
    per_datapoint: bool
    symmetric: bool = False


@st.composite
def class_specs(draw) -> ClassSpec:
    kind = draw(st.sampled_from(KINDS))
    n = draw(st.integers(3, 5)) if kind == "mixture" else draw(st.integers(4, 8))
    return ClassSpec(kind, draw(st.sampled_from(FORMS[kind])), n, draw(st.integers(0, 999)))


def build_class(spec: ClassSpec) -> ClassProgram:
    return _BUILDERS[spec.kind](spec, torch.Generator().manual_seed(spec.seed))


def _gaussian_evidence(x: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return dist.MultivariateNormal(torch.zeros(x.shape[-1], dtype=torch.float64),
                                   cov.double()).log_prob(x)


def _subsampled(spec: ClassSpec, g: torch.Generator) -> ClassProgram:
    n, t = spec.n, 0.5 + 2 * float(torch.rand((), generator=g))
    m = max(1, n // 2)
    x = t * torch.randn((), generator=g) + torch.randn(n, generator=g)
    post_var = 1 / (n + 1 / t**2)
    # q(mu): the posterior, off by a little in mean and scale.
    loc = float(x.sum()) * post_var + 0.3 * math.sqrt(post_var)
    scale = 1.3 * math.sqrt(post_var)

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, t))
        if spec.form == "sequential":
            for i in pyro.plate("data", len(x), subsample_size=m):
                pyro.sample(f"x_{i}", dist.Normal(mu, 1.0), obs=x[i])
            return
        with pyro.plate("data", len(x), subsample_size=m) as ind:
            obs = x[ind] if spec.form == "indices" else pyro.subsample(x, event_dim=0)
            pyro.sample("x", dist.Normal(mu, 1.0), obs=obs)

    def guide(x):
        pyro.sample("mu", dist.Normal(loc, scale))

    def exact(observed):
        data = (torch.stack([observed[f"x_{i}"] for i in range(n)], -1)
                if spec.form == "sequential" else observed["x"])
        return _gaussian_evidence(data, torch.eye(n) + t**2)

    observed = ({f"x_{i}": x[i] for i in range(n)} if spec.form == "sequential" else {"x": x})
    return ClassProgram(model, guide, x, exact, observed, per_datapoint=False)


def _conditioned(spec: ClassSpec, g: torch.Generator) -> ClassProgram:
    n, t = spec.n, 0.5 + float(torch.rand((), generator=g))
    f = torch.linspace(-1.0, 2.0, n)
    y = 1.5 * f + torch.randn(n, generator=g)

    def regression(features):
        w = pyro.sample("w", dist.Normal(0.0, t))
        with pyro.plate("data", len(features)):
            pyro.sample("y", dist.Normal(w * features, 1.0))

    precision = 1 / t**2 + float((f * f).sum())

    def guide(features):
        pyro.sample("w", dist.Normal(float((f * y).sum()) / precision, 1.2 / math.sqrt(precision)))

    def exact(observed):
        return _gaussian_evidence(observed["y"], torch.eye(n) + t**2 * torch.outer(f, f))

    return ClassProgram(pyro.condition(regression, data={"y": y}), guide, f, exact, {"y": y},
                        per_datapoint=False)


MIXTURE_SCALE = 5.0


def _mixture(spec: ClassSpec, g: torch.Generator) -> ClassProgram:
    k = 2 if spec.n > 3 else 3
    centres = torch.linspace(-6.0, 6.0, k)
    assignment = torch.arange(spec.n) % k
    x = centres[assignment] + torch.randn(spec.n, generator=g)
    prior_loc = centres if spec.form == "distinct" else torch.zeros(k)

    @config_enumerate
    def model(data):
        with pyro.plate("components", k):
            locs = pyro.sample("locs", dist.Normal(prior_loc, MIXTURE_SCALE))
        with pyro.plate("data", len(data)):
            a = pyro.sample("assignment", dist.Categorical(torch.full((k,), 1.0 / k)))
            # locs' own batch dimensions (particles) kept left of the data plate's.
            pyro.sample("x", dist.Normal(Vindex(locs.unsqueeze(-2))[..., a], 1.0), obs=data)

    counts = torch.bincount(assignment, minlength=k).float()
    sums = torch.zeros(k).index_add_(0, assignment, x)
    means = (sums + prior_loc / MIXTURE_SCALE**2) / (counts + 1 / MIXTURE_SCALE**2)

    def guide(data):
        with pyro.plate("components", k):
            pyro.sample("locs", dist.Normal(means, 1.1 / (counts + 1 / MIXTURE_SCALE**2).sqrt()))

    def exact(observed):
        data = observed["x"].double()
        out = []
        for row in data.reshape(-1, spec.n):
            terms = []
            for a in itertools.product(range(k), repeat=spec.n):
                a = torch.tensor(a)
                lp = -spec.n * math.log(k)
                for c in range(k):
                    xs = row[a == c] - float(prior_loc[c])
                    lp += float(_gaussian_evidence(xs, torch.eye(len(xs)) + MIXTURE_SCALE**2)) \
                        if len(xs) else 0.0
                terms.append(lp)
            out.append(torch.logsumexp(torch.tensor(terms, dtype=torch.float64), 0))
        return torch.stack(out).reshape(data.shape[:-1])

    return ClassProgram(model, guide, x, exact, {"x": x}, per_datapoint=False,
                        symmetric=spec.form == "exchangeable")


def correlation_cholesky(r: torch.Tensor) -> torch.Tensor:
    factor = torch.zeros(r.shape + (2, 2), dtype=r.dtype)
    factor[..., 0, 0], factor[..., 1, 0], factor[..., 1, 1] = 1, r, (1 - r**2).sqrt()
    return factor


def _covariance(spec: ClassSpec, g: torch.Generator) -> ClassProgram:
    eta = 1.0 + float(torch.rand((), generator=g))
    lkj = dist.LKJCholesky(2, torch.tensor(eta))
    rho = 0.8 * float(2 * torch.rand((), generator=g) - 1)
    x = 1.5 * torch.randn(spec.n, 2, generator=g) @ correlation_cholesky(torch.tensor(rho)).T

    def model(x):
        scale = pyro.sample("scale", dist.HalfCauchy(1.0))
        corr = pyro.sample("corr", lkj)
        factor = torch.mm(scale * torch.eye(2), corr)  # written for one draw: no broadcasting
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.MultivariateNormal(torch.zeros(2), scale_tril=factor), obs=x)

    def guide(x):
        pyro.sample("scale", dist.LogNormal(math.log(1.5), 0.4))
        pyro.sample("corr", dist.LKJCholesky(2, torch.tensor(eta + 2.0)))

    def exact(observed):
        data = observed["x"].double()
        log_s = torch.linspace(-5.0, 4.0, 451, dtype=torch.float64)
        r = torch.linspace(-1, 1, 801, dtype=torch.float64)[1:-1]
        s = log_s.exp()
        factor = s[:, None, None, None] * correlation_cholesky(r)[None]  # [S, R, 2, 2]
        prior = (dist.HalfCauchy(torch.tensor(1.0, dtype=torch.float64)).log_prob(s)
                 + log_s)[:, None] + lkj.log_prob(correlation_cholesky(r).float()).double()
        out = []
        for rows in data.reshape(-1, spec.n, 2):
            lik = dist.MultivariateNormal(torch.zeros(2, dtype=torch.float64),
                                          scale_tril=factor[:, :, None]).log_prob(rows).sum(-1)
            joint = lik + prior
            top = joint.max()
            inner = torch.trapezoid((joint - top).exp(), r, dim=1)
            out.append(top + torch.trapezoid(inner, log_s).log())
        return torch.stack(out).reshape(data.shape[:-2])

    return ClassProgram(model, guide, x, exact, {"x": x}, per_datapoint=False)


def _guide_discrete(spec: ClassSpec, g: torch.Generator) -> ClassProgram:
    locs = torch.tensor([-2.0, 0.0, 2.5])
    prior = torch.tensor([0.5, 0.3, 0.2])
    x = locs[torch.arange(spec.n) % 3] + torch.randn(spec.n, generator=g)
    sharpness = 0.5 + 3 * float(torch.rand((), generator=g))

    def model(x):
        with pyro.plate("data", len(x)):
            k = pyro.sample("k", dist.Categorical(prior))
            pyro.sample("x", dist.Normal(locs[k], 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("k", dist.Categorical(logits=-sharpness * (x.unsqueeze(-1) - locs) ** 2))

    def exact(observed):
        data = observed["x"].double().unsqueeze(-1)
        return torch.logsumexp(dist.Normal(locs.double(), 1.0).log_prob(data)
                               + prior.double().log(), -1)

    return ClassProgram(model, guide, x, exact, {"x": x}, per_datapoint=True)


_BUILDERS = {"subsampled": _subsampled, "conditioned": _conditioned, "mixture": _mixture,
             "covariance": _covariance, "guide_discrete": _guide_discrete}
