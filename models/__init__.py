"""Generative models p(x, z) written as Pyro programs.

``MODELS`` maps the names scripts accept (``--model vae``) to classes whose instances have a
``model(x)`` method; each is built from keyword arguments among ``data_dim``, ``latent_dim``,
``hidden_dims`` and ``likelihood``.
"""

from .linear_gaussian import LinearGaussian
from .vae import VAE

MODELS = {"vae": VAE, "linear-gaussian": LinearGaussian}

__all__ = ["MODELS", "LinearGaussian", "VAE"]
