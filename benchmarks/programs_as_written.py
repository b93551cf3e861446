"""Programs as users write them, which do not broadcast over a leading particle dimension: each
timed three ways in one run, on the same fitted-looking parameters.

* **loop**: elbogap forced to take the particles (and AIS's chains) one at a time;
* **vmap**: elbogap as it runs such a pair, ``torch.func.vmap`` over the particles;
* **hand-broadcast**: the same model rewritten by hand to broadcast (Pyro's particle plate).

Pairs: Pyro's Bayesian regression tutorial (``PyroModule[nn.Linear]`` with ``PyroSample`` priors,
``AutoNormal``, 170 points), the GMM tutorial's model with the guide drawing each point's
assignment (``locs[assignment]``), and a VAE on the 8x8 digits whose decoder has a
``BatchNorm1d`` (evaluation mode), which reads a ``[K, N, H]`` batch as ``[N, C, L]``.
evaluate takes K = 1000, AIS (from the prior) 8 chains x 200 steps.  "max |Δ| vs loop" is the largest
difference between the vmapped and the looped per-particle log-weights at the same draws
(evaluate), and of AIS's log-densities and gradients at the chains' starting states.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample
from torch import nn

from elbogap.data.readers import load_digits
from elbogap.diagnostics import ais, passes
from elbogap.diagnostics.ais import annealed_evidence
from elbogap.diagnostics.evaluation import evaluate
from elbogap.diagnostics.terms import particle_terms
from elbogap.diagnostics.vmapped_pass import vmapped_terms
from elbogap.foundations.data_plate import program_pair
from elbogap.foundations.errors import ConventionError
from elbogap.foundations.traces import trace_pair

WAYS = ("loop", "vmap", "hand-broadcast")
WIDE_CHUNK = 65_536  # rows per chunk: the default on a GPU (4096 on a CPU)


# --- Bayesian regression (Pyro's tutorial, Part I) ---------------------------------------

class BayesianRegression(PyroModule):
    def __init__(self, in_features: int = 3, out_features: int = 1):
        super().__init__()
        self.linear = PyroModule[nn.Linear](in_features, out_features)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([out_features, in_features])
                                        .to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([out_features]).to_event(1))

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Normal(mean, sigma), obs=y)


def regression_by_hand(x, y=None):
    """The same model, broadcasting: w @ x^T instead of nn.Linear."""
    sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
    w = pyro.sample("linear.weight", dist.Normal(0.0, 1.0).expand([1, 3]).to_event(2))
    b = pyro.sample("linear.bias", dist.Normal(0.0, 10.0).expand([1]).to_event(1))
    mean = (w @ x.T).squeeze(-2) + b
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("obs", dist.Normal(mean, sigma.unsqueeze(-1)), obs=y)


def regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(170, 3, generator=g)
    y = x @ torch.tensor([1.0, -0.5, 0.3]) + 0.7 + 0.8 * torch.randn(170, generator=g)
    model = BayesianRegression()
    guide = AutoNormal(model, init_scale=0.05)
    guide(x, y)
    # Near the posterior, as after the tutorial's SVI: loc at the least-squares fit.
    design = torch.cat([x, torch.ones(170, 1)], 1)
    coef = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1)
    with torch.no_grad():
        guide.locs.linear.weight.copy_(coef[:3].reshape(1, 3))
        guide.locs.linear.bias.copy_(coef[3:])
        residual = (y - design @ coef).std()
        guide.locs.sigma.copy_(torch.logit(residual / 10))  # Uniform(0, 10)'s unconstrained
    return model, guide, regression_by_hand, (x, y)


# --- Gaussian mixture (Pyro's GMM tutorial), the assignment drawn by the guide -----------

K_COMPONENTS = 2


def gmm(data):
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(K_COMPONENTS)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", K_COMPONENTS):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def gmm_by_hand(data):
    """The same model, broadcasting: torch.gather instead of locs[assignment]."""
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(K_COMPONENTS)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", K_COMPONENTS):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        loc = torch.gather(locs.expand(assignment.shape[:-1] + (K_COMPONENTS,)), -1, assignment)
        pyro.sample("obs", dist.Normal(loc, scale), obs=data)


def gmm_guide(data):
    """q(weights) Dirichlet, q(scale) LogNormal, q(locs) Normal, q(assignment_n) Categorical."""
    n = len(data)
    concentration = pyro.param("w_conc", torch.tensor([3.0, 4.0]),
                               constraint=dist.constraints.positive)
    pyro.sample("weights", dist.Dirichlet(concentration))
    pyro.sample("scale", dist.LogNormal(pyro.param("s_loc", torch.tensor(0.0)), 0.3))
    with pyro.plate("components", K_COMPONENTS):
        pyro.sample("locs", dist.Normal(pyro.param("l_loc", torch.tensor([0.5, 11.0])), 0.5))
    with pyro.plate("data", n):
        probs = pyro.param("a_probs", torch.tensor([[0.9, 0.1]] * 2 + [[0.1, 0.9]] * (n - 2)),
                           constraint=dist.constraints.simplex)
        pyro.sample("assignment", dist.Categorical(probs))


def gaussian_mixture():
    data = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0])
    return gmm, gmm_guide, gmm_by_hand, (data,)


# --- A VAE on the digits with a BatchNorm1d in its decoder -------------------------------

class Decoder(nn.Module):
    def __init__(self, z: int = 4, hidden: int = 32, pixels: int = 64):
        super().__init__()
        self.fc = nn.Linear(z, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.out = nn.Linear(hidden, pixels)
        with torch.no_grad():
            self.norm.running_mean.normal_(0, 0.2)
            self.norm.running_var.uniform_(0.5, 1.5)

    def forward(self, z):
        return self.out(torch.relu(self.norm(self.fc(z))))

    def by_hand(self, z):
        """BatchNorm1d in evaluation mode written as the affine map it is: broadcasts."""
        h = self.fc(z)
        n = self.norm
        h = (h - n.running_mean) / torch.sqrt(n.running_var + n.eps) * n.weight + n.bias
        return self.out(torch.relu(h))


class VAE(nn.Module):
    def __init__(self, z: int = 4):
        super().__init__()
        self.z = z
        self.decoder = Decoder(z)
        self.encoder = nn.Linear(64, 2 * z)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def model_by_hand(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder.by_hand(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        loc, raw = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 0.1).to_event(1))


def batchnorm_vae(points: int):
    torch.manual_seed(0)
    vae = VAE()
    x = (load_digits().train[:points] > 0.5).float()
    vae.eval()
    return vae.model, vae.guide, vae.model_by_hand, (x,)


PAIRS = {"Bayesian regression (PyroModule + AutoNormal)": regression,
         "GMM, assignment drawn by the guide": gaussian_mixture,
         "VAE with BatchNorm1d in the decoder": batchnorm_vae}


@contextlib.contextmanager
def forced_loop():
    """elbogap as it runs a pair that vmap cannot take: particles and chains one at a time."""
    original_layout, original_check = passes.with_vmap, ais.VmappedPath.differs
    passes.with_vmap = lambda model, guide, x, layout, plate: replace(
        layout, vmap=None, loop_reason="forced by the benchmark")
    ais.VmappedPath.differs = lambda self: "forced by the benchmark"
    try:
        yield
    finally:
        passes.with_vmap, ais.VmappedPath.differs = original_layout, original_check


def vmap_vs_loop_difference(model, guide, args, k: int = 50) -> float:
    """The largest |Δ| of a per-particle log-weight, vmapped against a plain pass at the same
    draws."""
    program = program_pair(model, guide, args, {}, None)
    m, g, x, plate = program.model, program.guide, program.data, program.data_plate
    with torch.no_grad():
        layout = passes.pass_layout(m, g, x, plate)
        terms, draws, _ = vmapped_terms(m, g, x, layout, k, plate)
        worst = 0.0
        for j in range(k):
            plain = particle_terms(*trace_pair(m, g, x, replay_guide=draws.particle(j)),
                                   layout, plate, 1, x.shape[0])
            worst = max(worst,
                        float((terms.log_weight[j] - plain.log_weight[0]).abs().max()),
                        float((terms.global_log_weight[j] - plain.global_log_weight[0]).abs()))
    return worst


def ais_vmap_vs_loop_difference(model, guide, args, chains: int) -> float:
    """The largest |Δ| of AIS's terms (log p, log base, Jacobian) and their gradients,
    vmapped over the chains against chain by chain, at the chains' starting states.  (The
    final weights of 200 HMC steps are no test: one accept decision flipped by rounding sends
    a chain elsewhere.)"""
    program = program_pair(model, guide, args, {}, None)
    path = ais.annealing_path(program.model, program.guide, program.data, chains, "prior",
                              program.data_plate)
    under_vmap, chain_by_chain = path.both_ways(path._draws(path.x))
    return max(_largest_difference(a, b)
               for a, b in zip(under_vmap, chain_by_chain, strict=True))


def _largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, where the same infinity (a start outside the support) or NaN in both
    counts as no difference."""
    same = (a == b) | (a.isnan() & b.isnan())
    return float(torch.where(same, 0.0, (a - b).abs()).max())


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def section(args) -> list[dict]:
    rows = []
    for name, make in PAIRS.items():
        pyro.clear_param_store()
        model, guide, by_hand, data = make(args.vae_points) if make is batchnorm_vae else make()
        way_models = {"loop": model, "vmap": model, "hand-broadcast": by_hand}
        results = {}
        for way in WAYS:
            context = forced_loop() if way == "loop" else contextlib.nullcontext()
            with context:
                pyro.set_rng_seed(0)
                seconds, d = timed(lambda m=way_models[way], g=guide, x=data: evaluate(
                    m, g, *x, num_samples=args.as_written_k))
                # The GPU's chunk on the CPU: the share of Python per chunk falls.
                wide = None if way == "loop" else timed(
                    lambda m=way_models[way], g=guide, x=data: evaluate(
                        m, g, *x, num_samples=args.as_written_k,
                        rows_per_chunk=WIDE_CHUNK))[0]
                try:
                    ais_seconds, a = timed(lambda m=way_models[way], g=guide, x=data:
                                           annealed_evidence(
                                               m, g, *x, num_chains=args.as_written_chains,
                                               num_steps=args.as_written_steps, start="prior",
                                               seed=0))
                except ConventionError as e:  # AIS moves continuous latents only
                    ais_seconds, a = None, str(e)
            results[way] = (seconds, d, ais_seconds, a, wide)
        refused = isinstance(results["vmap"][3], str)
        ais_delta = 0.0 if refused else ais_vmap_vs_loop_difference(
            model, guide, data, args.as_written_chains)
        delta = vmap_vs_loop_difference(model, guide, data)
        hand_eval, hand_ais = results["hand-broadcast"][0], results["hand-broadcast"][2]
        for way in WAYS:
            seconds, d, ais_seconds, a, wide = results[way]
            total = d.total
            rows.append({
                "pair": name, "way": way, "k": args.as_written_k,
                "evaluate_seconds": seconds, "evaluate_vs_hand": seconds / hand_eval,
                "evaluate_vs_loop": results["loop"][0] / seconds,
                "evaluate_seconds_wide_chunks": wide,
                "evaluate_wide_vs_loop": None if wide is None else results["loop"][0] / wide,
                # Per data point where that is the unit (as AIS's), else of the data set.
                "log_evidence": (total.log_evidence if d.unit == "data set"
                                 else float(d.log_evidence.mean())),
                "log_evidence_se": (total.log_evidence_se if d.unit == "data set" else
                                    float(d.log_evidence_se.pow(2).sum().sqrt())
                                    / len(d.log_evidence)),
                "ais_chains": args.as_written_chains, "ais_steps": args.as_written_steps,
                "ais_seconds": ais_seconds,
                "ais_vs_hand": None if refused else ais_seconds / hand_ais,
                "ais_vs_loop": None if refused else results["loop"][2] / ais_seconds,
                "ais_refused": a if refused else None,
                "ais_log_evidence": None if refused else float(a.log_evidence.mean()),
                "ais_log_evidence_se": None if refused else float(a.log_evidence_se.mean()),
                "max_delta_vs_loop": {"loop": 0.0, "vmap": max(delta, ais_delta)}.get(way),
            })
    return rows


def markdown_rows(rows: list[dict]) -> list[str]:
    lines = ["", "| program as written | way | evaluate K | s | × hand | loop ÷ this | "
             "s, 65 536 rows/chunk (loop ÷ this) | log p(x) ± SE | AIS chains × steps | s | "
             "× hand | loop ÷ this | AIS log p(x) ± SE | max \\|Δ\\| vs loop |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        delta = "–" if r["max_delta_vs_loop"] is None else f"{r['max_delta_vs_loop']:.1e}"
        lines.append(
            f"| {r['pair']} | {r['way']} | {r['k']} | {r['evaluate_seconds']:.2f} | "
            f"{r['evaluate_vs_hand']:.2f} | {r['evaluate_vs_loop']:.1f} | "
            + ("– | " if r["evaluate_seconds_wide_chunks"] is None else
               f"{r['evaluate_seconds_wide_chunks']:.2f} ({r['evaluate_wide_vs_loop']:.0f}) | ")
            + f"{r['log_evidence']:.3f} ± {r['log_evidence_se']:.3f} | "
            + (f"refused: {r['ais_refused']} | – | – | – | – | " if r["ais_refused"] else
               f"{r['ais_chains']} × {r['ais_steps']} | {r['ais_seconds']:.1f} | "
               f"{r['ais_vs_hand']:.2f} | {r['ais_vs_loop']:.1f} | "
               f"{r['ais_log_evidence']:.2f} ± {r['ais_log_evidence_se']:.2f} | ")
            + f"{delta} |")
    return lines
