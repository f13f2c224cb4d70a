"""What the shapes checker rejects in a dVAE's reconstructions: the fidelity ceiling it leaves
DALL-E, the PSNR, and per true object which shape the checker reads back instead.

    python -m bench.dvae_shape_errors --dvae_workdir runs/demo/dvae [--num_scenes 500]

Prints one JSON line per split. Each true object (found in the original by the checker) is
matched to the nearest object found in the reconstruction; `wrong` counts (true shape, read
shape) pairs that differ, `missing` when the reconstruction shows no object at all.
"""
from __future__ import annotations

import argparse
import collections
import json

import numpy as np


def shape_errors(originals: np.ndarray, recons: np.ndarray, captions: list[str]) -> dict:
    from core_jax.data import shapes_checker as chk
    objects, wrong, passed = collections.Counter(), collections.Counter(), 0
    for original, recon, caption in zip(originals, recons, captions):
        found = chk.detect_objects(recon)
        passed += chk.caption_fidelity(recon, caption) > 0
        for obj in chk.detect_objects(original):
            objects[obj["shape"]] += 1
            if not found:
                wrong[f"{obj['shape']}->missing"] += 1
                continue
            dist = [np.hypot(f["centre"][0] - obj["centre"][0], f["centre"][1] - obj["centre"][1])
                    for f in found]
            read = found[int(np.argmin(dist))]["shape"]
            if read != obj["shape"]:
                wrong[f"{obj['shape']}->{read}"] += 1
    mse = ((recons.astype(np.float64) - originals) ** 2).mean(axis=(1, 2, 3))
    return {"scenes": len(captions), "ceiling": passed / len(captions),
            "psnr_per_image_mean": float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10)))),
            "objects": dict(objects), "wrong": dict(sorted(wrong.items())),
            "wrong_fraction": {s: round(sum(v for k, v in wrong.items() if k.startswith(s + "->"))
                                        / n, 3) for s, n in objects.items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dvae_workdir", required=True)
    ap.add_argument("--num_scenes", type=int, default=500)
    ap.add_argument("--splits", default="test_seen,test_unseen")
    ap.add_argument("--batch_size", type=int, default=100)
    args = ap.parse_args(argv)
    from core_jax.data import shapes
    from dalle_jax.dvae_api import DVAE
    vae = DVAE.load(args.dvae_workdir)
    for split in args.splits.split(","):
        examples = [shapes.make_example(split, i) for i in range(args.num_scenes)]
        originals = np.stack([e["image"] for e in examples])
        recons = np.concatenate([np.asarray(vae.decode(vae.encode(originals[i:i + args.batch_size])))
                                 for i in range(0, len(originals), args.batch_size)])
        row = shape_errors(originals, recons, [e["caption"] for e in examples])
        print(json.dumps({"split": split, "dvae_workdir": args.dvae_workdir, **row}), flush=True)


if __name__ == "__main__":
    main()
