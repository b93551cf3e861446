"""Small random Pyro programs, written the ways users write them, built from a ``Spec``.

A model draws one to three latent sites of several families (Normal, LogNormal, Gamma, Beta,
Dirichlet, Bernoulli), global or in a data plate of some name, each prior perhaps depending on
the site before it, and observes x through a decoder of the latents' features; a guide samples
the same sites in the model's order or the reverse one (each site then conditioned on the one
drawn before it).  Options add what real programs have: factors in the model and in the guide,
an observed site in the guide, ``poutine.mask``, ``obs_mask``, ``pyro.deterministic``,
``poutine.scale``, and decoders with Dropout or BatchNorm left in training mode or one that
normalizes along a fixed axis of a ``[N, D]`` batch with N = D.  A model may also be a mixture:
a discrete state per data point, marked for parallel enumeration and summed out, that shifts the
decoder's output.  A spec may also ask for a program the diagnostics must refuse: a site marked
for *sequential* enumeration, a point mass in the guide.

A program may also be written so that it does not broadcast over a leading particle dimension
(``UNBROADCAST``), as most programs users write are not: ``nn.functional.linear`` on a sampled
weight, a ``PyroModule[nn.Linear]`` whose weight is a ``PyroSample``, a sampled table indexed by
a sampled integer, a Python loop over the plate's rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from pyro import poutine
from pyro.nn import PyroModule, PyroSample
from torch import nn

FAMILIES = ("normal", "lognormal", "gamma", "beta", "dirichlet", "bernoulli")
DECODERS = ("linear", "softmax_axis", "dropout", "batchnorm")
# Constructs that do not broadcast over particles; the first three add global sites.
UNBROADCAST = ("sampled_weight", "pyro_module", "sampled_index", "row_loop")


@dataclass(frozen=True)
class Site:
    name: str
    family: str
    local: bool  # inside the data plate
    parent: bool  # the prior depends on the site before it


@dataclass(frozen=True)
class Spec:
    n: int
    d: int
    plate: str
    sites: tuple[Site, ...]
    reversed_guide: bool
    model_factor: bool
    guide_factor: bool
    guide_observed: bool
    masked: bool
    obs_masked: bool
    deterministic: bool
    scaled: bool
    decoder: str
    mixture: bool  # a discrete state per point, enumerated in the model and summed out
    refusal: str | None  # None, "sequential", "point_mass"
    unbroadcast: str | None = None  # one of UNBROADCAST

    @property
    def per_datapoint(self) -> bool:
        return all(site.local for site in self.sites) and self.unbroadcast in (None, "row_loop")


@st.composite
def specs(draw) -> Spec:
    n = draw(st.integers(3, 5))
    decoder = draw(st.sampled_from(DECODERS))
    # The fixed-axis decoder is wrong under particles only when N == D: make it so.
    d = n if decoder in ("softmax_axis", "batchnorm") else draw(st.integers(2, 4))
    count = draw(st.integers(1, 3))
    sites = []
    for i in range(count):
        local = draw(st.booleans()) if i == 0 else (sites[-1].local or draw(st.booleans()))
        family = draw(st.sampled_from(FAMILIES))
        parent = i > 0 and sites[-1].family != "dirichlet" and (local or not sites[-1].local) \
            and draw(st.booleans())
        sites.append(Site(f"z{i}", family, local, parent))
    # The guide's reverse order conditions a site on one drawn after it in the model: only
    # between sites of the same kind (both global or both in the plate).
    reversible = len({site.local for site in sites}) == 1
    obs_masked = draw(st.booleans())
    unbroadcast = draw(st.sampled_from((None, None) + UNBROADCAST))
    if unbroadcast == "row_loop" and decoder == "batchnorm":
        # BatchNorm in training mode refuses a batch of one row (torch's own error).
        unbroadcast = "sampled_weight"
    return Spec(
        n=n, d=d, plate=draw(st.sampled_from(("data", "rows", "documents"))), sites=tuple(sites),
        reversed_guide=reversible and draw(st.booleans()),
        model_factor=draw(st.booleans()), guide_factor=draw(st.booleans()),
        guide_observed=draw(st.booleans()), masked=draw(st.booleans()),
        obs_masked=obs_masked, deterministic=draw(st.booleans()),
        scaled=draw(st.booleans()), decoder=decoder,
        # obs_mask's unobserved values are latents whose prior would depend on the state: a
        # refusal of its own (tests/real_programs/test_programs_as_written.py), not drawn here.
        mixture=not obs_masked and draw(st.booleans()),
        refusal=draw(st.sampled_from((None, None, None, None, "sequential", "point_mass"))),
        unbroadcast=unbroadcast)


def center(value: torch.Tensor, family: str) -> torch.Tensor:
    """A real number per draw of a site, for its children and the decoder."""
    if family == "dirichlet":
        return value[..., 0]
    return value


def prior(family: str, c: torch.Tensor) -> dist.Distribution:
    s = F.softplus(c)
    if family == "normal":
        return dist.Normal(0.5 * c, 1.0)
    if family == "lognormal":
        return dist.LogNormal(0.1 * c, 0.5)
    if family == "gamma":
        return dist.Gamma(1.5 + s, 1.5)
    if family == "beta":
        return dist.Beta(1.0 + s, 2.0)
    if family == "dirichlet":
        return dist.Dirichlet((0.5 + s).unsqueeze(-1).expand(c.shape + (3,)))
    return dist.Bernoulli(logits=0.3 * c)


def posterior_guess(family: str, c: torch.Tensor) -> dist.Distribution:
    s = F.softplus(c)
    if family == "normal":
        return dist.Normal(0.3 * c, 0.8)
    if family == "lognormal":
        return dist.LogNormal(0.05 * c, 0.6)
    if family == "gamma":
        return dist.Gamma(2.0 + 0.5 * s, 1.2)
    if family == "beta":
        return dist.Beta(1.5 + 0.2 * s, 2.5)
    if family == "dirichlet":
        base = torch.tensor([1.2, 0.8, 1.5])
        return dist.Dirichlet(base + 0.1 * s.unsqueeze(-1))
    return dist.Bernoulli(logits=0.2 * c)


class Head(PyroModule):
    """A ``PyroModule[nn.Linear]`` whose weight is a ``PyroSample`` (site ``head.weight``), as
    Pyro's Bayesian regression tutorial writes one."""

    def __init__(self, m: int, d: int):
        super().__init__()
        self.head = PyroModule[nn.Linear](m, d)
        self.head.weight = PyroSample(dist.Normal(0.0, 1.0).expand([d, m]).to_event(2))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


class Decoder(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        torch.manual_seed(len(spec.sites) + spec.d)
        m = len(spec.sites)
        self.kind = spec.decoder
        self.linear = nn.Linear(m, spec.d)
        if spec.decoder == "dropout":
            self.extra = nn.Dropout(0.3)
        elif spec.decoder == "batchnorm":
            self.extra = nn.BatchNorm1d(spec.d)
            self.extra.running_mean.normal_()
        else:
            self.extra = nn.Identity()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.extra(self.linear(features))
        return torch.log_softmax(h, dim=1) if self.kind == "softmax_axis" else h


def build(spec: Spec):
    """(model, guide, x) of a spec; the decoder is left in training mode, as tutorials do."""
    decoder = Decoder(spec)
    g = torch.Generator().manual_seed(spec.n * 7 + spec.d)
    x = torch.randn(spec.n, spec.d, generator=g)
    keep = torch.ones(spec.n, dtype=torch.bool)
    keep[0] = False
    obs_mask = torch.ones(spec.n, dtype=torch.bool)
    obs_mask[-1] = False

    head = Head(len(spec.sites), spec.d)

    def unbroadcast(f: torch.Tensor) -> torch.Tensor:
        """The decoder's output with the spec's construct that does not broadcast."""
        m = len(spec.sites)
        if spec.unbroadcast == "row_loop":
            return torch.stack([decoder(f[i:i + 1])[0] for i in range(f.shape[-2])])
        h = decoder(f)
        if spec.unbroadcast == "sampled_weight":
            w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([spec.d, m]).to_event(2))
            h = h + F.linear(f, w)
        elif spec.unbroadcast == "pyro_module":
            h = h + head(f)
        elif spec.unbroadcast == "sampled_index":
            table = pyro.sample("table", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
            j = pyro.sample("j", dist.Categorical(torch.ones(3) / 3))
            h = h + table[j]
        return h

    def features(values: dict, x: torch.Tensor) -> torch.Tensor:
        parts = [center(values[site.name], site.family).float() for site in spec.sites]
        parts = torch.broadcast_tensors(*parts, x[..., 0])[:-1]
        return torch.stack(parts, -1)

    def model(x):
        pyro.module("decoder", decoder)
        values = {}
        plate = pyro.plate(spec.plate, x.shape[0], dim=-1)
        previous = None
        for site in spec.sites:
            c = x.new_zeros(()) if previous is None or not site.parent else center(
                values[previous.name], previous.family).float()
            if site.local:
                # A global parent's value broadcasts against the plate as it is.
                with plate, poutine.mask(mask=keep) if spec.masked else _nothing():
                    values[site.name] = pyro.sample(site.name, prior(site.family, c))
            else:
                values[site.name] = pyro.sample(site.name, prior(site.family, c))
            previous = site
        h = unbroadcast(features(values, x))
        with plate:
            shift = 0.0
            if spec.mixture or spec.refusal == "sequential":
                how = "sequential" if spec.refusal == "sequential" else "parallel"
                k = pyro.sample("k", dist.Bernoulli(x.new_full((), 0.3)), infer={"enumerate": how})
                shift = 1.5 * k.unsqueeze(-1)
            h = h + shift
            if spec.deterministic:
                pyro.deterministic("h_total", h.sum(-1))
            if spec.model_factor:
                pyro.factor("penalty", -0.05 * h.pow(2).sum(-1))
            with poutine.scale(scale=0.5) if spec.scaled else _nothing():
                pyro.sample("x", dist.Normal(h, 1.0).to_event(1), obs=x,
                            obs_mask=obs_mask if spec.obs_masked else None)

    def guide(x):
        values = {}
        plate = pyro.plate(spec.plate, x.shape[0], dim=-1)
        order = list(reversed(spec.sites)) if spec.reversed_guide else list(spec.sites)
        previous = None
        for site in order:
            c = (x.mean(-1) if site.local else x.mean())
            if previous is not None and spec.reversed_guide:
                c = c + 0.5 * center(values[previous.name], previous.family).float()
            fn = posterior_guess(site.family, c)
            if spec.refusal == "point_mass" and previous is None:
                fn = dist.Delta(fn.sample(), event_dim=fn.event_dim)
            if site.local:
                with plate, poutine.mask(mask=keep) if spec.masked else _nothing():
                    values[site.name] = pyro.sample(site.name, fn)
            else:
                values[site.name] = pyro.sample(site.name, fn)
            previous = site
        m = len(spec.sites)
        if spec.unbroadcast == "sampled_weight":
            pyro.sample("w", dist.Normal(0.1, 0.7).expand([spec.d, m]).to_event(2))
        elif spec.unbroadcast == "pyro_module":
            pyro.sample("head.weight", dist.Normal(-0.1, 0.8).expand([spec.d, m]).to_event(2))
        elif spec.unbroadcast == "sampled_index":
            pyro.sample("table", dist.Normal(0.2, 0.8).expand([3]).to_event(1))
            pyro.sample("j", dist.Categorical(torch.tensor([0.5, 0.3, 0.2])))
        with plate:
            if spec.obs_masked:
                pyro.sample("x_unobserved",
                            dist.Normal(x.new_zeros(spec.d), 2.0).to_event(1).mask(~obs_mask))
            if spec.guide_factor:
                pyro.factor("guide_penalty", -0.1 * (x.mean(-1) - 0.2).pow(2), has_rsample=True)
            if spec.guide_observed:
                pyro.sample("label", dist.Bernoulli(logits=x.mean(-1)),
                            obs=(x[..., 0] > 0).float())

    return model, guide, x


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *args):
        return False

