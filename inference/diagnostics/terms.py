"""The terms of one pass of a pair, per particle: what every estimate of ``evaluate`` is made of.

A pass traces the guide on a batch of x and replays the model on its draws (k particles at once,
or one at a time).  From the two traces, per particle:

* the log-weight log p(x, z_k) - log q(z_k | x) and the model's observed sites' log p(x | z_k),
  per data point for sites in the data plate, and for the whole pass for sites outside it;
* KL(q || p) of each latent unit (a site, or the sites an autoguide draws jointly), per data
  point and coordinate: in closed form where torch knows it and the guide's order makes it
  valid (``PairLayout.closed_form``), else the Monte Carlo log q(z_k) - log p(z_k);
* the guide's observed sites and factors, which are no part of q: kept apart;
* E_q[z | x] of each local latent site (its distribution's mean), for the active units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributions import biject_to, transforms

from ..foundations.pair_layout import PairLayout, datapoint_rows, per_datapoint
from ..foundations.traces import apply_mask, data_frame, is_point_mass, sample_sites, site_log_prob
from .kl import MONTE_CARLO, SiteKL, kl_to_prior


@dataclass(frozen=True)
class KLTerm:
    """KL(q || p) of one latent unit per particle, data point and coordinate ``[k, N or 1, D]``
    (N or 1: in the data plate or outside it), and how it was computed."""

    value: torch.Tensor
    method: str


@dataclass
class ParticleTerms:
    """One pass's terms per particle ``k`` (float64): per data point ``[k, N]`` from the sites in
    the data plate, per pass ``[k]`` from the sites outside it."""

    log_weight: torch.Tensor
    global_log_weight: torch.Tensor
    reconstruction: torch.Tensor
    global_reconstruction: torch.Tensor
    kl: dict[str, KLTerm]
    latent_mean: dict[str, torch.Tensor]  # [k, N, D] per local latent site
    # The guide's observed sites and factors (a term of its objective, not of q).
    guide_observed: torch.Tensor
    global_guide_observed: torch.Tensor
    # log q(z_k | x) alone (its latent and auxiliary sites), for proposals mixed with it.
    log_q: torch.Tensor
    global_log_q: torch.Tensor
    # The per-particle ELBO that the log-weight's Monte Carlo KL deviation is centred on, where
    # it is not log_weight itself (discrete guide sites summed over: ``discrete_guide``).
    elbo_log_weight: torch.Tensor | None = None

    @property
    def log_prior(self) -> torch.Tensor:
        """log p(z_k) per point: the model's latent sites in the data plate."""
        return self.log_weight - self.reconstruction + self.log_q

    @classmethod
    def cat(cls, parts: list[ParticleTerms]) -> ParticleTerms:
        """The terms of passes of particles one after another, as one set of particles."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        return cls(
            log_weight=torch.cat([p.log_weight for p in parts]),
            global_log_weight=torch.cat([p.global_log_weight for p in parts]),
            reconstruction=torch.cat([p.reconstruction for p in parts]),
            global_reconstruction=torch.cat([p.global_reconstruction for p in parts]),
            kl={name: KLTerm(torch.cat([p.kl[name].value for p in parts]), term.method)
                for name, term in first.kl.items()},
            latent_mean={name: torch.cat([p.latent_mean[name] for p in parts])
                         for name in first.latent_mean},
            guide_observed=torch.cat([p.guide_observed for p in parts]),
            global_guide_observed=torch.cat([p.global_guide_observed for p in parts]),
            log_q=torch.cat([p.log_q for p in parts]),
            global_log_q=torch.cat([p.global_log_q for p in parts]),
            elbo_log_weight=(None if first.elbo_log_weight is None
                             else torch.cat([p.elbo_log_weight for p in parts])),
        )

    def first_points(self, keep: int) -> ParticleTerms:
        """The terms of the pass's first ``keep`` data points (a pass that wrapped around x
        repeats points already counted)."""
        return ParticleTerms(
            log_weight=self.log_weight[:, :keep],
            global_log_weight=self.global_log_weight,
            reconstruction=self.reconstruction[:, :keep],
            global_reconstruction=self.global_reconstruction,
            kl={name: KLTerm(term.value[:, :keep], term.method) for name, term in self.kl.items()},
            latent_mean=self.latent_mean,
            guide_observed=self.guide_observed[:, :keep],
            global_guide_observed=self.global_guide_observed,
            log_q=self.log_q[:, :keep],
            global_log_q=self.global_log_q,
            elbo_log_weight=(None if self.elbo_log_weight is None
                             else self.elbo_log_weight[:, :keep]),
        )


def particle_terms(guide_trace, model_trace, layout: PairLayout, data_plate: str, k: int,
                   n: int) -> ParticleTerms:
    """The terms of one pass over ``n`` data points with ``k`` particles."""
    model_sites = sample_sites(model_trace)
    guide_sites = sample_sites(guide_trace)

    def reduce(values, site, trailing=0):
        out = per_datapoint(values, site, layout, data_plate, trailing).double()
        rows = n if data_frame(site, data_plate) is not None else 1
        return out.expand((k, rows) + out.shape[2:])

    # Each site's log-density once: the weights use all of them, the Monte Carlo KLs some.
    model_lp = {name: reduce(site_log_prob(site), site) for name, site in model_sites.items()}
    guide_lp = {name: reduce(site_log_prob(site), site) for name, site in guide_sites.items()}
    local_w = torch.zeros(k, n, dtype=torch.float64)
    global_w = torch.zeros(k, dtype=torch.float64)
    recon = torch.zeros(k, n, dtype=torch.float64)
    global_recon = torch.zeros(k, dtype=torch.float64)
    guide_obs = torch.zeros(k, n, dtype=torch.float64)
    global_guide_obs = torch.zeros(k, dtype=torch.float64)
    log_q = torch.zeros(k, n, dtype=torch.float64)
    global_log_q = torch.zeros(k, dtype=torch.float64)
    for name, site in guide_sites.items():
        local = data_frame(site, data_plate) is not None
        if name in layout.guide_observed:
            if local:
                guide_obs = guide_obs + guide_lp[name]
            else:
                global_guide_obs = global_guide_obs + guide_lp[name][:, 0]
        elif local:
            log_q = log_q + guide_lp[name]
        else:
            global_log_q = global_log_q + guide_lp[name][:, 0]
    for sign, sites, lps in ((1.0, model_sites, model_lp), (-1.0, guide_sites, guide_lp)):
        for name, site in sites.items():
            if sign < 0 and name in layout.guide_observed:
                continue  # no part of q
            lp = lps[name]
            if data_frame(site, data_plate) is not None:
                local_w = local_w + sign * lp
                if site["is_observed"]:
                    recon = recon + lp
            else:
                global_w = global_w + sign * lp[:, 0]
                if site["is_observed"]:
                    global_recon = global_recon + lp[:, 0]
    latent_mean = {}
    for name in layout.latent:
        site = guide_sites[name]
        if data_frame(site, data_plate) is not None:
            latent_mean[name] = _site_mean(site, guide_sites, layout, data_plate).expand(
                k, n, -1).double()
    return ParticleTerms(
        log_weight=local_w, global_log_weight=global_w, reconstruction=recon,
        global_reconstruction=global_recon,
        kl=_kl_units(model_sites, guide_sites, model_lp, guide_lp, layout, reduce),
        latent_mean=latent_mean, guide_observed=guide_obs, global_guide_observed=global_guide_obs,
        log_q=log_q, global_log_q=global_log_q)


def _kl_units(model_sites: dict, guide_sites: dict, model_lp: dict, guide_lp: dict,
              layout: PairLayout, reduce) -> dict[str, KLTerm]:
    """KL(q || p) of each latent site, in closed form where torch knows it and the guide's order
    allows it (``layout.closed_form``); the sites an autoguide draws jointly from one auxiliary
    site form one unit named after them all (Monte Carlo).  ``model_lp``/``guide_lp`` are the
    sites' reduced log-densities, ``[k, N or 1]``."""
    kl: dict[str, KLTerm] = {}
    grouped: list[str] = []
    used_aux: set[str] = set()
    for name in layout.latent:
        q_site, p_site = guide_sites[name], model_sites[name]
        closed_form = name in layout.closed_form
        if not is_point_mass(q_site["fn"]):
            site_kl = _safe_kl(q_site["fn"], p_site["fn"], q_site["value"], closed_form)
            value = _masked(site_kl.value, site_kl.event_ndim, q_site, p_site)
            kl[name] = KLTerm(_per_dim(reduce, value, q_site, site_kl.event_ndim), site_kl.method)
            continue
        aux = guide_sites.get(f"{name}_unconstrained")
        if aux is None or aux["name"] not in layout.auxiliary:
            grouped.append(name)
            continue
        used_aux.add(aux["name"])
        # AutoNormal: z = T(u), u ~ aux.  With T the identity q(z) is aux's distribution.
        if closed_form and _is_identity(p_site["fn"]):
            site_kl = _safe_kl(aux["fn"], p_site["fn"], q_site["value"])
            value = _masked(site_kl.value, site_kl.event_ndim, aux, p_site)
            kl[name] = KLTerm(_per_dim(reduce, value, aux, site_kl.event_ndim), site_kl.method)
        else:
            value = guide_lp[aux["name"]] + guide_lp[name] - model_lp[name]
            kl[name] = KLTerm(value.unsqueeze(-1), MONTE_CARLO)
    if grouped:
        parts = [guide_lp[a].sum(1, keepdim=True) for a in layout.auxiliary if a not in used_aux]
        parts += [(guide_lp[name] - model_lp[name]).sum(1, keepdim=True) for name in grouped]
        kl[" + ".join(grouped)] = KLTerm(sum(parts).unsqueeze(-1), MONTE_CARLO)
    return kl


def _masked(value: torch.Tensor, event_ndim: int, *sites: dict) -> torch.Tensor:
    """A KL masked as the sites' log-densities are: else it would count steps the weights do
    not."""
    for site in sites:
        value = apply_mask(value, site, event_ndim)
    return value


def _per_dim(reduce, values, site, event_ndim) -> torch.Tensor:
    out = reduce(values, site, event_ndim)
    return out.reshape(out.shape[0], out.shape[1], -1)


def _is_identity(p) -> bool:
    t = biject_to(p.support)
    while isinstance(t, transforms.IndependentTransform):
        t = t.base_transform
    return t == transforms.identity_transform


def _safe_kl(q, p, z, closed_form: bool = True) -> SiteKL:
    """Closed form where torch has one, it is valid for the pair and it computes; any failure
    of it (torch's KL functions that index with masks, say) falls back to Monte Carlo."""
    try:
        return kl_to_prior(q, p, z, closed_form)
    except Exception:  # noqa: BLE001 - a KL function that fails is one we cannot use
        return SiteKL(q.log_prob(z) - p.log_prob(z), 0, MONTE_CARLO)


def _site_mean(site: dict, guide_sites: dict, layout: PairLayout, data_plate: str) -> torch.Tensor:
    """E_q[z | x] at a guide site as ``[k, N, D]``: the distribution's mean, else the draw."""
    fn = site["fn"]
    if is_point_mass(fn):
        aux = guide_sites.get(f"{site['name']}_unconstrained")
        if aux is not None and aux["fn"].event_shape == fn.event_shape:
            fn = aux["fn"]  # AutoNormal's unconstrained Normal: its mean, on that scale
    try:
        if fn.support.is_discrete and fn.has_enumerate_support:
            # Categorical's own mean is NaN in torch: the mean over its values, exactly.
            values = fn.enumerate_support(expand=False)
            probs = fn.log_prob(values).exp()
            mean = (probs.reshape(probs.shape + (1,) * len(fn.event_shape)) * values).sum(0)
            mean = mean.expand(fn.batch_shape + fn.event_shape)
        else:
            mean = fn.mean.expand(fn.batch_shape + fn.event_shape)
    except NotImplementedError:
        mean = site["value"]
    return datapoint_rows(mean, site, layout, data_plate, len(fn.event_shape))
