"""How far each unCLIP sampler's discretisation is from exact, on Gaussian data with its exact
denoiser (no network, no sampling noise).

For data x0 ~ N(mu, sd^2) the model's best eps prediction is closed form and a deterministic
sampler (DDIM eta 0, DPM-Solver++) maps the start sample x_T linearly: x0 = A x_T + c. The exact
probability-flow map from the noisiest timestep (alpha_T, sigma_T) is A* = sd / sqrt(alpha_T^2 sd^2
+ sigma_T^2), c* = mu - A* alpha_T mu (A* ~ sd: alpha_T is 5e-5 for the cosine schedule, 6e-3 for
the linear one). Running the sampler on x_T = 0 and x_T = 1 reads off c and A; the table prints
the relative error (A - A*) / A* and |c - c*| per sampler, step count and schedule.

    python -m bench.diffusion_toy [--steps 10,20,50] [--sd 0.5,1.5]   # prints a markdown table
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.unclip.samplers import sample
from dalle_jax.unclip.schedule import alpha_sigma, make_schedule


def linear_map(schedule, sampler: str, steps: int, mu: np.ndarray, sd: np.ndarray):
    """(A, c) of the deterministic sampler's map x_T -> x0, per data dim."""

    def exact_eps(x, t):
        alpha, sigma = alpha_sigma(schedule, t, x.ndim)
        return sigma * (x - alpha * mu) / (alpha**2 * sd**2 + sigma**2)

    probes = jnp.stack([jnp.zeros(len(mu)), jnp.ones(len(mu))])
    out = np.asarray(sample(exact_eps, probes, jax.random.PRNGKey(0), schedule, sampler=sampler, steps=steps))
    return out[1] - out[0], out[0]


def exact_map(schedule, mu: np.ndarray, sd: np.ndarray):
    bar = schedule.alphas_cumprod[-1]
    a = sd / np.sqrt(bar * sd**2 + 1.0 - bar)
    return a, mu - a * np.sqrt(bar) * mu


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", default="10,20,50,100")
    ap.add_argument("--sd", default="0.5,1.5", help="data standard deviations, one per dim")
    args = ap.parse_args(argv)
    sd = np.array([float(v) for v in args.sd.split(",")])
    mu = np.linspace(0.5, -1.0, len(sd))
    print(
        "| schedule | sampler | steps | "
        + " | ".join(f"(A - A*) / A* at sd {v:g}" for v in sd)
        + " | max abs(c - c*) |"
    )
    print("| --- | --- | --- | " + " | ".join("---" for _ in sd) + " | --- |")
    for kind in ("cosine", "linear"):
        schedule = make_schedule(kind)
        a_exact, c_exact = exact_map(schedule, mu, sd)
        for sampler in ("ddim", "dpmpp"):
            for steps in (int(v) for v in args.steps.split(",")):
                a, c = linear_map(schedule, sampler, steps, mu, sd)
                rel = " | ".join(f"{e:+.2%}" for e in (a - a_exact) / a_exact)
                print(f"| {kind} | {sampler} | {steps} | {rel} | {np.abs(c - c_exact).max():.1e} |")


if __name__ == "__main__":
    main()
