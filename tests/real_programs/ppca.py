"""Probabilistic PCA with Pyro's autoguides on its local latents, as a Pyro user would write it.

    z_n ~ Normal(0, I_k),  x_n | z_n ~ Normal(W z_n + b, sigma^2 I)        plate "data"

W, b and sigma are fixed tensors (the model has no parameters), so log p(x_n) is exact:
x_n ~ N(b, W W^T + sigma^2 I).  AutoNormal's loc and scale are per data point (its plate
mirrors the model's), so it runs only on the data it was built for.
"""

import pyro
import pyro.distributions as dist
import torch

D, K, SIGMA = 5, 2, 0.5


def parameters(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D, K, generator=g), torch.randn(D, generator=g)


W, B = parameters()


def model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(K), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T + B, SIGMA).to_event(1), obs=x)


def data(n: int = 30, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, K, generator=g)
    return z @ W.T + B + SIGMA * torch.randn(n, D, generator=g)


def exact_log_evidence(x) -> torch.Tensor:
    cov = (W @ W.T + SIGMA**2 * torch.eye(D)).double()
    return torch.distributions.MultivariateNormal(B.double(), cov).log_prob(x.double())
