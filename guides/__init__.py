"""Variational families q(z | x) written as Pyro programs that mirror the models.

``GUIDES`` maps the names scripts accept (``--guide mean-field``) to classes whose instances
have a ``guide(x)`` method, built from ``data_dim``, ``latent_dim`` and ``hidden_dims``.
"""

from .full_rank import FullRankGuide
from .iaf import IAFGuide
from .linear import LinearEncoderGuide, OptimalMeanFieldGuide
from .mean_field import MeanFieldGuide

GUIDES = {
    "mean-field": MeanFieldGuide,
    "full-rank": FullRankGuide,
    "iaf": IAFGuide,
    "linear": LinearEncoderGuide,
    "optimal-mean-field": OptimalMeanFieldGuide,
}

__all__ = ["GUIDES", "FullRankGuide", "IAFGuide", "LinearEncoderGuide", "MeanFieldGuide",
           "OptimalMeanFieldGuide"]
