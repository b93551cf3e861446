"""Draws of the guide with their importance log-weights, as an ArviZ ``InferenceData``, so that
users can go on in ArviZ."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..foundations.conventions import inspect_pair
from ..foundations.data_plate import takes_program_arguments
from ..foundations.pair_layout import datapoint_rows, per_datapoint
from ..foundations.program_data import ProgramData
from ..foundations.psis import import_arviz
from ..foundations.traces import sample_sites, site_log_prob
from .passes import traced_particles


@takes_program_arguments
def guide_inference_data(
    model: Callable, guide: Callable, x: ProgramData, *, num_draws: int = 1000,
    data_plate: str | None = None,
):
    """q(z | x_n) draws for each row of ``x``: group ``posterior`` holds one variable per latent
    site, dims (chain, draw, point, <site>_dim); ``sample_stats`` the importance log-weights
    log p(x_n, z) - log q(z | x_n) of those draws; ``observed_data`` the points themselves: each argument
    of the program that holds a row per point, under its name (``x`` for a single one)."""
    layout = inspect_pair(model, guide, x, data_plate)
    with torch.no_grad():
        # One vectorized pass, or a pass per draw for a pair that does not broadcast.
        passes = traced_particles(model, guide, x, layout, num_draws)
    per_pass = num_draws // len(passes)
    draws: dict[str, list[torch.Tensor]] = {}
    log_ws = []
    for guide_trace, model_trace in passes:
        log_w = torch.zeros(per_pass, x.shape[0], dtype=torch.float64)
        for name, site in sample_sites(guide_trace).items():
            rows = datapoint_rows(site["value"], site, layout, data_plate,
                                  len(site["fn"].event_shape))
            draws.setdefault(name, []).append(rows.expand(per_pass, x.shape[0], rows.shape[-1]))
            log_w -= per_datapoint(site_log_prob(site), site, layout, data_plate).double()
        for site in sample_sites(model_trace).values():
            log_w += per_datapoint(site_log_prob(site), site, layout, data_plate).double()
        log_ws.append(log_w)
    posterior = {name: torch.cat(parts).double().numpy()[None] for name, parts in draws.items()}
    dims = {name: ["point", f"{name}_dim"] for name in draws}
    log_w = torch.cat(log_ws)
    observed = {name: value.detach().double().reshape(x.shape[0], -1).cpu().numpy()
                for name, value in x.named_rows().items()}
    return import_arviz().from_dict(
        posterior=posterior,
        sample_stats={"log_importance_weight": log_w.numpy()[None]},
        observed_data=observed,
        dims={**dims, "log_importance_weight": ["point"],
              **{name: ["point", f"{name}_dim"] for name in observed}},
        coords={"point": np.arange(x.shape[0])},
    )
