"""Guidance's cost on whatever device JAX has: guided sampling (cond and uncond rows in ONE batched
pass per token) over unguided, with the KV cache, 256 image tokens, at the sampling bench's two
widths and at batch 4 and 16. The same measurement as bench_sampling's guidance rows, standalone,
so that it can run on an accelerator (where the < 1.2x target is about reading the weights once).

    python -m bench.guidance_cost [--size full|quick|toy]     # prints one JSON line per setting
"""

from __future__ import annotations

import argparse
import json
import time

from bench import bench_sampling, common

KEYS = (
    "d_model",
    "num_layers",
    "batch",
    "image_tokens",
    "guided_over_unguided",
    "guided_over_two_passes",
    "unguided_images_per_sec",
    "guided_images_per_sec",
)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="full", choices=common.SIZES)
    args = ap.parse_args(argv)
    import jax

    print(json.dumps({"device": str(jax.devices()[0]), "jax": jax.__version__}), flush=True)
    preset = bench_sampling.PRESETS[args.size]
    models = {
        preset["guidance_model"]["d_model"]: preset["guidance_model"],
        preset["model"]["d_model"]: preset["model"],
    }
    for model in models.values():
        for batch in (4, 16):
            t0 = time.perf_counter()
            r = bench_sampling.measure_guidance(dict(preset, batch=batch), model)
            row = {k: r[k] for k in KEYS}
            row.update(
                unguided_best_s=r["unguided"]["best"],
                guided_best_s=r["guided"]["best"],
                wall_s=round(time.perf_counter() - t0, 1),
            )
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
