"""The unCLIP prior's prefix KV cache against recomputing the whole sequence at every sampling
step, at the shapes config's size with random weights (only the time depends on them).

    python -m bench.prior_cache [--rows 32] [--steps 64] [--cond_scale 2]

Prints the median and min of 5 jitted sampling calls each way and the largest difference of the
two samples (float32 rounding; dalle_jax/unclip/prior_sample.py).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from core_jax.app import load_config
from dalle_jax.unclip import prior, prior_sample, prior_task

# /work/runs/clip_demo's sizes (configs/clip_shapes.py): 128-dim embeddings, text width 128, 16 tokens.
CLIP_DIM, TEXT_WIDTH, TEXT_LENGTH = 128, 128, 16


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--cond_scale", type=float, default=2.0)
    args = parser.parse_args()
    config = load_config("unclip_prior_shapes")
    config.model.clip_dim, config.model.text_width, config.model.text_length = (
        CLIP_DIM,
        TEXT_WIDTH,
        TEXT_LENGTH,
    )
    model = prior.PriorTransformer(prior_task.prior_spec(config))
    params = jax.jit(
        lambda r: jax.tree.map(
            lambda x: x.value, prior.init_params(model, r), is_leaf=lambda x: hasattr(x, "value")
        )
    )(jax.random.key(0))
    schedule = prior_task.noise_schedule(config)
    rng = np.random.default_rng(0)
    cond = {
        "text_states": rng.standard_normal((args.rows, TEXT_LENGTH, TEXT_WIDTH)).astype(np.float32),
        "text_mask": np.arange(TEXT_LENGTH)[None] < rng.integers(4, TEXT_LENGTH + 1, args.rows)[:, None],
        "text_embedding": rng.standard_normal((args.rows, CLIP_DIM)).astype(np.float32),
    }
    x_T = jax.random.normal(jax.random.key(0), (args.rows, CLIP_DIM))
    samples = {}
    for use_cache in (True, False):
        draw = jax.jit(
            lambda p, c, x, use_cache=use_cache: prior_sample.sample_prior(
                model,
                schedule,
                p,
                c,
                x,
                jax.random.key(1),
                sampler="ddim",
                steps=args.steps,
                cond_scale=args.cond_scale,
                use_cache=use_cache,
            )
        )
        samples[use_cache] = np.asarray(draw(params, cond, x_T))
        times = []
        for _ in range(5):
            start = time.perf_counter()
            draw(params, cond, x_T).block_until_ready()
            times.append(time.perf_counter() - start)
        print(f"use_cache={use_cache}: median {np.median(times) * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms")
    print(f"max |cached - recomputed| = {float(np.abs(samples[True] - samples[False]).max()):.2g}")


if __name__ == "__main__":
    main()
