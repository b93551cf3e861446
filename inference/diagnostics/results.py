"""What ``evaluate`` returns: ``Diagnostics`` (per data point, or for a data set its
``DataSetTotals``), their summary as plain numbers, and the active units.  A ``Diagnostics``
shows itself as the summary table, in a terminal and in Jupyter, and plots its KL per dimension
and its k-hat."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

import torch
from matplotlib.figure import Figure

from ..foundations.psis import MIN_SAMPLES_KHAT, khat_summary
from ..foundations.statistics import finite_or_none, mean_and_se
from ..presentation.figures import plot_khat_histogram, plot_kl_per_dim, shown
from ..presentation.table import format_summary, labels, summary_html
from .kl import MONTE_CARLO

# Burda et al. (2016): a latent dimension is active when Cov_x(E_q[z_d | x]) exceeds this.
ACTIVE_UNIT_THRESHOLD = 0.01

PER_DATAPOINT_FIELDS = (
    "elbo",
    "reconstruction",
    "kl_prior",
    "log_evidence",
    "evidence_gap",
)
# The per-point tensors of a Diagnostics (shape [N]), as batches and ranks concatenate them.
POINT_TENSORS = ("elbo", "elbo_se", "reconstruction", "reconstruction_se", "kl_prior",
                 "log_evidence", "log_evidence_se", "evidence_gap", "evidence_gap_se", "khat",
                 "ess")

DATA_POINT = "data point"
DATA_SET = "data set"


@dataclass
class DataSetTotals:
    """The data set's numbers, in nats (sums over points for a pair of local latents)."""

    num_data: int
    elbo: float
    elbo_se: float | None
    reconstruction: float
    kl_prior: float
    log_evidence: float
    log_evidence_se: float | None
    evidence_gap: float
    evidence_gap_se: float | None
    # One k-hat and ESS of the joint weights (global latents); per point otherwise (None here).
    khat: float | None = None
    ess: float | None = None
    reconstruction_se: float | None = None

    def as_dict(self) -> dict:
        return {k: (finite_or_none(v) if isinstance(v, float) else v)
                for k, v in asdict(self).items()}


@dataclass
class Diagnostics:
    """Diagnostics of a guide on a data set.

    For a pair of local latents every tensor of shape ``[N]`` is per data point, in nats.  For a
    pair with global latents (``unit == "data set"``) the per-point fields are None, and
    ``khat``/``ess``/``log_weights`` are those of the joint weights (one "point": the data set).
    """

    elbo: torch.Tensor | None
    elbo_se: torch.Tensor | None
    reconstruction: torch.Tensor | None
    kl_prior: torch.Tensor | None
    log_evidence: torch.Tensor | None
    log_evidence_se: torch.Tensor | None
    evidence_gap: torch.Tensor | None
    evidence_gap_se: torch.Tensor | None
    kl_sites: dict[str, torch.Tensor]
    kl_per_dim: dict[str, torch.Tensor]
    kl_method: dict[str, str]
    khat: torch.Tensor
    ess: torch.Tensor
    latent_mean: dict[str, torch.Tensor]
    num_samples: int
    total: DataSetTotals | None = None
    unit: str = DATA_POINT
    notes: list[str] = field(default_factory=list)
    log_weights: torch.Tensor | None = field(default=None, repr=False)
    # The model's observed sites, and whether they hold only part of x (a conditional model,
    # whose evidence is log p(y | inputs)): the tables' labels say which.
    observed: tuple[str, ...] = ("x",)
    conditional: bool = False
    # ELBO surgery's summary (elbogap.diagnostics.surgery), when evaluate computed it.
    elbo_surgery: dict | None = None
    # Exchangeable components found in the program (elbogap.diagnostics.symmetry): how many
    # mirror modes, the log K! bound, and the mode-averaged log p(x) where it could be taken.
    mirror_modes: dict | None = None
    # Monte Carlo SE of each point's reconstruction, the plain mean of its K draws.
    reconstruction_se: torch.Tensor | None = None
    # Per point, the mean log-density of the guide's observed sites and factors (no part of q:
    # Pyro's Trace_ELBO subtracts it, the ELBO here does not); None without such sites.
    guide_observed: torch.Tensor | None = None
    # Draws behind log p(x), k-hat and ESS where they are more than K (a defensive proposal).
    proposal_draws: int | None = None

    def __repr__(self) -> str:
        return format_summary(self.summary())

    def _repr_html_(self) -> str:
        return summary_html(self.summary())

    def plot_kl_per_dim(self) -> Figure:
        """A matplotlib figure: the mean KL to the prior of every latent dimension.  In
        Jupyter it is shown at once (each plot of a cell is seen); it is returned as well."""
        return shown(plot_kl_per_dim(self.summary()["kl_per_dim"], self.unit == DATA_SET))

    def plot_khat(self) -> Figure:
        """A matplotlib figure: the histogram of the importance weights' Pareto k-hat.  In
        Jupyter it is shown at once (each plot of a cell is seen); it is returned as well."""
        return shown(plot_khat_histogram(self.khat.numpy()))

    def active_units(self, threshold: float = ACTIVE_UNIT_THRESHOLD) -> dict[str, torch.Tensor]:
        """Per latent site, which dimensions have Cov_x(E_q[z_d | x]) > threshold."""
        return {name: _nan_var(m) > threshold for name, m in self.latent_mean.items()}

    @property
    def num_data(self) -> int:
        return self.total.num_data

    def summary(self) -> dict:
        """Dataset means, each with the standard error of the mean over data points; for a
        pair with global latents, the data set's totals."""
        out: dict = {"unit": self.unit, "num_data": self.num_data,
                     "num_samples": self.num_samples, "total": self.total.as_dict(),
                     "observed": list(self.observed), "conditional": self.conditional}
        if self.unit == DATA_POINT:
            for name in PER_DATAPOINT_FIELDS:
                out[name] = mean_and_se(getattr(self, name))
            # Monte Carlo error of the dataset means (independent across points): what
            # separates an estimate from the exact value on the same points.
            n = self.num_data
            out["log_evidence_mc_se"] = finite_or_none(self.log_evidence_se.mean().item())
            out["reconstruction_mc_se"] = finite_or_none(
                self.reconstruction_se.double().pow(2).sum().sqrt().item() / n)
            out["evidence_gap_mc_se"] = finite_or_none(
                self.evidence_gap_se.double().pow(2).sum().sqrt().item() / n
            )
            out["kl_sites"] = {
                name: {**mean_and_se(value), "method": self.kl_method[name]}
                for name, value in self.kl_sites.items()
            }
            out["kl_per_dim"] = {
                name: [float(v) for v in value.nanmean(0)] for name, value in self.kl_per_dim.items()
            }
        else:
            out["kl_sites"] = {
                name: {"mean": float(value.sum()), "se": None, "method": self.kl_method[name]}
                for name, value in self.kl_sites.items()
            }
            out["kl_per_dim"] = {
                name: [float(v) for v in value.sum(0)] for name, value in self.kl_per_dim.items()
            }
        if self.num_samples >= MIN_SAMPLES_KHAT:
            out["khat"] = khat_summary(self.khat, self.unit, self.ess,
                                       self.proposal_draws or self.num_samples)
            # One name in one output: the verdict calls the evidence what the table does.
            evidence = labels(out)["evidence"]
            verdict = out["khat"]["verdict"]
            for said in ("log p(x_1..N)", "log p(x)"):
                verdict = verdict.replace(said, evidence)
            out["khat"]["verdict"] = verdict
        out["ess"] = {"mean": float(self.ess.mean()), "min": float(self.ess.min()),
                      "of": self.proposal_draws or self.num_samples}
        out["active_units"] = active_units_summary(self)
        out["notes"] = list(self.notes)
        if self.elbo_surgery is not None:
            out["elbo_surgery"] = self.elbo_surgery
        if self.mirror_modes is not None:
            out["mirror_modes"] = self.mirror_modes
        return out


def _nan_var(m: torch.Tensor) -> torch.Tensor:
    """Variance over data points (dim 0) of values that are NaN where a point lacks the site."""
    centred = m - m.nanmean(0)
    return centred.pow(2).nanmean(0)


def active_units_summary(d: Diagnostics) -> dict:
    """Active dimensions per site and a warning when most are not (posterior collapse)."""
    if d.unit != DATA_POINT or d.num_data < 2 or not d.latent_mean:
        return {"sites": {}, "active": None, "total": None, "warning": None}
    active = d.active_units()
    variances = {name: _nan_var(m) for name, m in d.latent_mean.items()}
    total = sum(int(a.numel()) for a in active.values())
    count = sum(int(a.sum()) for a in active.values())
    warning = None
    if count * 2 < total:
        warning = (
            f"posterior collapse: only {count} of {total} latent dimensions are active "
            f"(Cov_x(E_q[z]) > {ACTIVE_UNIT_THRESHOLD}); the rest carry no information about x"
        )
    return {
        "sites": {
            name: {"active": int(active[name].sum()), "total": int(active[name].numel()),
                   "variance": [float(v) for v in variances[name]]}
            for name in active
        },
        "active": count,
        "total": total,
        "warning": warning,
    }


def on_cpu(d: Diagnostics) -> Diagnostics:
    """``d`` with every tensor on the CPU (for plots, numpy and pickling across ranks)."""
    for f in fields(d):
        value = getattr(d, f.name)
        if torch.is_tensor(value):
            setattr(d, f.name, value.cpu())
        elif isinstance(value, dict) and value and torch.is_tensor(next(iter(value.values()))):
            setattr(d, f.name, {k: v.cpu() for k, v in value.items()})
    return d


def first_points(d: Diagnostics, keep: int) -> Diagnostics:
    """The diagnostics of ``d``'s first ``keep`` points (of a pass that wrapped around x)."""
    return replace(
        d, **{name: getattr(d, name)[:keep] for name in POINT_TENSORS},
        kl_sites={name: v[:keep] for name, v in d.kl_sites.items()},
        kl_per_dim={name: v[:keep] for name, v in d.kl_per_dim.items()},
        latent_mean={name: v[:keep] for name, v in d.latent_mean.items()},
        log_weights=None if d.log_weights is None else d.log_weights[:, :keep],
        guide_observed=None if d.guide_observed is None else d.guide_observed[:keep])


def data_set_totals(d: Diagnostics, n: int) -> DataSetTotals:
    """Sums over the points of a pair of local latents (independent Monte Carlo errors)."""
    def se(values):
        return float(values.double().pow(2).sum().sqrt())

    return DataSetTotals(
        num_data=n, elbo=float(d.elbo.sum()), elbo_se=se(d.elbo_se),
        reconstruction=float(d.reconstruction.sum()), kl_prior=float(d.kl_prior.sum()),
        reconstruction_se=se(d.reconstruction_se),
        log_evidence=float(d.log_evidence.sum()), log_evidence_se=se(d.log_evidence_se),
        evidence_gap=float(d.evidence_gap.sum()), evidence_gap_se=se(d.evidence_gap_se),
    )


def concatenate(parts: list[Diagnostics], num_samples: int) -> Diagnostics:
    """One Diagnostics from those of batches (or ranks) of points; a site some batches lack
    adds nothing to their points (KL 0, no latent mean: NaN)."""
    sizes = [p.elbo.shape[0] for p in parts]

    def merged(key, fill):
        names = list(dict.fromkeys(name for p in parts for name in getattr(p, key)))
        out = {}
        for name in names:
            template = next(getattr(p, key)[name] for p in parts if name in getattr(p, key))
            out[name] = torch.cat([
                getattr(p, key)[name] if name in getattr(p, key)
                else template.new_full((size,) + template.shape[1:], fill)
                for p, size in zip(parts, sizes, strict=True)
            ])
        return out

    kl_method = {}
    for p in parts:
        for name, method in p.kl_method.items():
            # A site that needed Monte Carlo in any batch is reported as such.
            if kl_method.get(name) != MONTE_CARLO:
                kl_method[name] = method
    kl_per_dim = merged("kl_per_dim", 0.0)
    d = Diagnostics(
        **{key: torch.cat([getattr(p, key) for p in parts]) for key in POINT_TENSORS},
        kl_sites={name: v.sum(1) for name, v in kl_per_dim.items()},
        kl_per_dim=kl_per_dim,
        kl_method=kl_method,
        latent_mean=merged("latent_mean", float("nan")),
        num_samples=num_samples,
        notes=list(dict.fromkeys(note for p in parts for note in p.notes)),
        log_weights=(torch.cat([p.log_weights for p in parts], 1)
                     if parts[0].log_weights is not None else None),
        guide_observed=(torch.cat([p.guide_observed for p in parts])
                        if parts[0].guide_observed is not None else None),
    )
    d.total = data_set_totals(d, sum(sizes))
    return d
