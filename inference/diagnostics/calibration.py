"""Simulation-based calibration of an amortized guide (Talts, Betancourt, Simpson, Vehtari &
Gelman 2018), per latent coordinate.

A simulation is one data point of the program's own: z* ~ p(z) and x* ~ p(x | z*), drawn by the
model on the user's arguments with every observed site uncondition-ed (``bdmc.simulate``); the
guide, run on the simulated arguments, gives L draws of q(z | x*), and the rank of z* among them,
r = #{l : z_l < z*} in 0..L, is recorded per coordinate of every local latent site.  Where q is
the posterior the ranks are uniform; for an encoder each simulation costs one forward pass.

Per coordinate:

* **uniformity**: Pearson's chi-square over ``bins`` equal bins of the ranks, its p-value, and
  Holm's step-down correction across all coordinates (a verdict other than "calibrated" only
  where the corrected p-value is below ``level``);
* **direction**, from the probit of the fractional rank, w = Phi^-1((r + 1/2) / (L + 1)): where
  q = N(m + delta s, (c s)^2) misses a posterior N(m, s^2), w ~ N(-delta / c, 1 / c^2), so its
  mean measures the shift alone and its variance the width alone.  The shift z-score of mean w
  (> 0: the true value sits above q's draws: q is **shifted low**; < 0: **shifted high**) and
  the spread z-score of var w against its value under uniform ranks (> 0: ranks at both ends,
  q **too narrow**; < 0: ranks in the middle, **too wide**), each against the moments of w
  over the L + 1 ranks; a miscalibrated coordinate is named by each of the two beyond
  Bonferroni's two-sided bound at ``level`` over the coordinates (or "miscalibrated", where
  neither is: a departure of another shape).

A guide that is not conditioned on the data (an autoguide's parameters per point, global
latents) has no q(z | x*) to ask: such a pair is refused with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from matplotlib.figure import Figure
from pyro import poutine

from ..foundations.conventions import inspect_pair
from ..foundations.data_plate import takes_program_arguments
from ..foundations.ecdf_band import ecdf_difference_band
from ..foundations.errors import ConventionError, OptionError
from ..foundations.keyed_noise import stream_key
from ..foundations.module_mode import evaluation_mode
from ..foundations.pair_layout import PairLayout, datapoint_rows
from ..foundations.program_data import ProgramData
from ..foundations.rng import seeded
from ..foundations.traces import first_line, in_particles, sample_sites, user_frame
from ..presentation.figures import plot_ecdf_differences, plot_rank_histograms, shown
from .bdmc import simulate

CALIBRATED = "calibrated"


@dataclass
class Calibration:
    """Ranks of the simulating latents among the guide's draws, per site ``[M, D]`` (M
    simulations, D coordinates), and each coordinate's test and direction."""

    ranks: dict[str, torch.Tensor]
    num_draws: int
    bins: int
    level: float
    p_value: dict[str, torch.Tensor]
    p_adjusted: dict[str, torch.Tensor]
    spread_z: dict[str, torch.Tensor]
    shift_z: dict[str, torch.Tensor]

    @property
    def num_simulations(self) -> int:
        return next(iter(self.ranks.values())).shape[0]

    def verdict(self, site: str) -> list[str]:
        """Per coordinate of ``site``: "calibrated", or the directions of its miscalibration."""
        coordinates = sum(len(p) for p in self.p_value.values())
        bound = math.sqrt(2) * float(torch.special.erfinv(torch.tensor(
            1 - self.level / coordinates, dtype=torch.float64)))
        out = []
        for p, spread, shift in zip(self.p_adjusted[site].tolist(), self.spread_z[site].tolist(),
                                    self.shift_z[site].tolist(), strict=True):
            if p >= self.level:
                out.append(CALIBRATED)
                continue
            found = []
            if abs(shift) > bound:
                found.append("shifted low" if shift > 0 else "shifted high")
            if abs(spread) > bound:
                found.append("too narrow" if spread > 0 else "too wide")
            out.append(", ".join(found) or "miscalibrated")
        return out

    def worst(self, count: int) -> list[tuple[str, int]]:
        """The ``count`` coordinates ``(site, dim)`` with the smallest p-values, worst first."""
        found = [(float(p), name, d) for name, ps in self.p_value.items()
                 for d, p in enumerate(ps.tolist())]
        return [(name, d) for _, name, d in sorted(found)[:count]]

    def _panels(self, count: int, scaled: bool) -> list:
        out = []
        for name, d in self.worst(count):
            r = self.ranks[name][:, d].numpy()
            verdict = self.verdict(name)[d]
            title = f"{name}[{d}]: {verdict} (Holm p {float(self.p_adjusted[name][d]):.2g})"
            out.append((title, (r + 0.5) / (self.num_draws + 1) if scaled else r))
        return out

    def plot_ranks(self, max_panels: int = 12) -> Figure:
        """Rank histograms, one panel per latent coordinate, the worst first (in Jupyter shown
        at once; returned as well)."""
        return shown(plot_rank_histograms(self._panels(max_panels, False), self.num_draws,
                                          self.bins))

    def plot_ecdf(self, max_panels: int = 12) -> Figure:
        """ECDF-difference plots with simultaneous 95 % bands, the worst coordinates first (in
        Jupyter shown at once; returned as well)."""
        return shown(self.ecdf_figure(max_panels))

    def ecdf_figure(self, max_panels: int = 12) -> Figure:
        """``plot_ecdf``'s figure, not shown (for a report or a file)."""
        z, lower, upper = ecdf_difference_band(self.num_simulations, self.num_draws + 1)
        return plot_ecdf_differences(self._panels(max_panels, True), z.numpy(), lower.numpy(),
                                     upper.numpy())

    def summary(self) -> dict:
        sites = {}
        for name in self.ranks:
            sites[name] = [{"dim": d, "p_value": float(self.p_value[name][d]),
                            "p_adjusted": float(self.p_adjusted[name][d]),
                            "spread_z": float(self.spread_z[name][d]),
                            "shift_z": float(self.shift_z[name][d]), "verdict": v}
                           for d, v in enumerate(self.verdict(name))]
        flagged = [f"{name}[{d['dim']}]: {d['verdict']}" for name, dims in sites.items()
                   for d in dims if d["verdict"] != CALIBRATED]
        return {"method": "amortized sbc", "num_simulations": self.num_simulations,
                "num_draws": self.num_draws, "bins": self.bins, "level": self.level,
                "correction": "holm", "sites": sites, "miscalibrated": flagged}


@takes_program_arguments
def calibration(
    model: Callable,
    guide: Callable,
    x_like: ProgramData,
    *,
    num_simulations: int = 1000,
    num_draws: int = 99,
    bins: int = 20,
    level: float = 0.05,
    data_plate: str | None = None,
    seed: int | None = None,
    train_mode: bool = False,
) -> Calibration:
    """Simulation-based calibration of an amortized guide: ``num_simulations`` points simulated
    from the model on arguments shaped as ``x_like`` (whose rows are simulated anew as often as
    needed), ``num_draws`` (L) guide draws each, ranks per latent coordinate, tested for
    uniformity over ``bins`` bins (L + 1 a multiple of it) at ``level`` after Holm's correction.
    The pair's modules are in evaluation mode, unless ``train_mode``."""
    _check_options(num_simulations, num_draws, bins, level)
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    with evaluation_mode(model, guide, train_mode), torch.no_grad():
        layout = inspect_pair(model, guide, x_like, data_plate)
        _check_pair(model, guide, x_like, layout, data_plate, seed)
        prior = sample_sites(poutine.trace(poutine.uncondition(model)).get_trace(x_like))
        parts: dict[str, list[torch.Tensor]] = {}
        done, round_ = 0, 0
        while done < num_simulations:
            with seeded(stream_key(seed, f"sbc/{round_}"), x_like.device):
                simulation = simulated(model, x_like, data_plate)
                draws = guide_draws_per_point(guide, simulation.data, layout, num_draws,
                                              data_plate)
            for name, values in draws.items():
                if not torch.isfinite(values).all():
                    raise ConventionError(
                        f"the guide's draws of site '{name}' on data simulated from the model "
                        "are not finite: their ranks say nothing")
                site = prior[name]
                truth = datapoint_rows(simulation.latents[name].unsqueeze(0), site, layout,
                                       data_plate, site["fn"].event_dim)
                parts.setdefault(name, []).append((values < truth).sum(0))
            done += x_like.shape[0]
            round_ += 1
    ranks = {name: torch.cat(p)[:num_simulations] for name, p in parts.items()}
    return _tested(ranks, num_draws, bins, level)


def _check_options(num_simulations: int, num_draws: int, bins: int, level: float) -> None:
    if not (isinstance(num_draws, int) and num_draws >= 1):
        raise OptionError("num_draws", f"must be a positive integer, got {num_draws!r}")
    if not (isinstance(bins, int) and bins >= 2 and (num_draws + 1) % bins == 0):
        raise OptionError("bins", f"must be an integer >= 2 dividing num_draws + 1 "
                                  f"({num_draws + 1}) into equal bins, got {bins!r}")
    if not (isinstance(num_simulations, int) and num_simulations >= 5 * bins):
        raise OptionError("num_simulations",
                          f"must be at least 5 per bin ({5 * bins} for {bins} bins) for the "
                          f"chi-square test, got {num_simulations!r}")
    if not 0 < level < 1:
        raise OptionError("level", f"must be in (0, 1), got {level!r}")


def _check_pair(model: Callable, guide: Callable, x: ProgramData, layout: PairLayout,
                data_plate: str | None, seed: int) -> None:
    """Refuse what amortized SBC cannot take, saying why."""
    require_latent(layout)
    if not layout.per_datapoint:
        raise ConventionError(
            f"amortized calibration asks the guide for q(z | x*) on simulated points, but sites "
            f"{list(layout.global_sites)} are outside the data plate: a guide of global latents "
            "is fitted to one data set, and must be refitted per simulated data set: "
            "elbogap.vsbc")
    trace = poutine.trace(guide).get_trace(x)
    for name in layout.latent:
        if trace.nodes[name]["fn"].support.is_discrete:
            raise ConventionError(f"latent site '{name}' is discrete: its ranks among the "
                                  "guide's draws have ties, which calibration by ranks excludes")
    # A guide conditioned on the data draws other values on other data, from the same noise.
    with seeded(stream_key(seed, "sbc/check")):
        simulation = simulated(model, x, data_plate)
    with seeded(stream_key(seed, "sbc/conditioned")):
        here = poutine.trace(guide).get_trace(x)
    with seeded(stream_key(seed, "sbc/conditioned")), pyro.validation_enabled(False):
        there = poutine.trace(guide).get_trace(simulation.data)
    if all(torch.equal(here.nodes[n]["value"], there.nodes[n]["value"]) for n in layout.latent):
        raise ConventionError(
            "the guide draws the same z whatever the data (it is not conditioned on x: an "
            "autoguide's parameters per point, say): it has no q(z | x*) for a simulated point "
            "to be calibrated against; refit it per simulated data set: elbogap.vsbc")


def require_latent(layout: PairLayout) -> None:
    if not layout.latent:
        raise ConventionError(
            "the model has no latent sample site to calibrate (a pyro.param is a point "
            "estimate, not drawn from a prior)")


def simulated(model: Callable, x: ProgramData, data_plate: str | None):
    """``bdmc.simulate``, a prior that cannot be sampled refused in one line."""
    try:
        return simulate(model, x, data_plate)
    except ConventionError:
        raise
    except Exception as e:  # noqa: BLE001 - a prior that cannot be sampled, said in one line
        raise ConventionError(f"calibration simulates from the model's prior, which failed: "
                              f"{type(e).__name__}: {first_line(e)}") from e


def guide_draws_per_point(guide: Callable, data: ProgramData, layout: PairLayout, num_draws: int,
                 data_plate: str | None) -> dict[str, torch.Tensor]:
    """``num_draws`` draws of each latent site per point, ``[L, N, D]`` (``[L, 1, D]`` for a
    site outside the data plate): in the particle plate, or one pass per draw for a guide that
    does not broadcast over it."""
    with pyro.validation_enabled(False):
        try:
            traces = [(poutine.trace(in_particles(guide, num_draws, layout.particle_dim))
                       .get_trace(data), num_draws)]
            _check_draws(traces[0][0], layout, num_draws)
        except Exception:  # noqa: BLE001 - a guide that does not broadcast: one draw a pass
            try:
                traces = [(poutine.trace(guide).get_trace(data), 1) for _ in range(num_draws)]
            except Exception as e:  # noqa: BLE001 - the user's guide, said in one line
                raise ConventionError(f"the guide failed on data simulated from the model"
                                      f"{user_frame(e)}: {type(e).__name__}: {first_line(e)}"
                                      ) from e
    out = {}
    for name in layout.latent:
        rows = [datapoint_rows(t.nodes[name]["value"], t.nodes[name], layout, data_plate,
                               t.nodes[name]["fn"].event_dim) for t, _ in traces]
        out[name] = torch.cat(rows)
    return out


def _check_draws(trace, layout: PairLayout, num_draws: int) -> None:
    for name in layout.latent:
        site = trace.nodes[name]
        batch = site["value"].dim() - site["fn"].event_dim
        if batch < layout.max_plate_nesting + 1 or site["value"].shape[0] != num_draws:
            raise ValueError(f"site '{name}' did not take the particle dimension")


def _tested(ranks: dict[str, torch.Tensor], num_draws: int, bins: int,
            level: float) -> Calibration:
    p_value, spread_z, shift_z = {}, {}, {}
    per_bin = (num_draws + 1) // bins
    for name, r in ranks.items():
        m = r.shape[0]
        counts = torch.stack([torch.bincount(r[:, d] // per_bin, minlength=bins)
                              for d in range(r.shape[1])], 1).double()
        expected = m / bins
        stat = ((counts - expected) ** 2 / expected).sum(0)
        # The chi-square survival function with bins - 1 degrees of freedom.
        p_value[name] = torch.special.gammaincc(torch.tensor((bins - 1) / 2.0,
                                                             dtype=torch.float64), stat / 2)
        grid = _probit((torch.arange(num_draws + 1, dtype=torch.float64) + 0.5)
                       / (num_draws + 1))
        v0, m4 = grid.pow(2).mean(), grid.pow(4).mean()  # under uniform ranks (mean 0)
        w = grid[r]
        shift_z[name] = w.mean(0) / torch.sqrt(v0 / m)
        spread_z[name] = (w.var(0) - v0) / torch.sqrt((m4 - v0**2) / m)
    return Calibration(ranks=ranks, num_draws=num_draws, bins=bins, level=level,
                       p_value=p_value, p_adjusted=holm(p_value), spread_z=spread_z,
                       shift_z=shift_z)


def _probit(u: torch.Tensor) -> torch.Tensor:
    return math.sqrt(2) * torch.special.erfinv(2 * u - 1)


def holm(p_value: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Holm's step-down adjusted p-values across every coordinate of every site."""
    names = list(p_value)
    flat = torch.cat([p_value[n] for n in names])
    order = torch.argsort(flat)
    m = len(flat)
    adjusted = torch.empty_like(flat)
    running = 0.0
    for i, j in enumerate(order.tolist()):
        running = max(running, min(1.0, (m - i) * float(flat[j])))
        adjusted[j] = running
    out, start = {}, 0
    for n in names:
        out[n] = adjusted[start:start + len(p_value[n])]
        start += len(p_value[n])
    return out
