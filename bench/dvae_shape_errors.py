"""What the shapes checker rejects in a dVAE's reconstructions: the fidelity ceiling it leaves
DALL-E, the PSNR, and per true object which shape the checker reads back instead.

    python -m bench.dvae_shape_errors --dvae_workdir runs/demo/dvae [--num_scenes 500]

Prints one JSON line per split. Each true object (found in the original by the checker) is
matched to the nearest object found in the reconstruction; `wrong` counts (true shape, read
shape) pairs that differ, `missing` when the reconstruction shows no object at all. Where the
squared error sits: its share on edge pixels (colour differs from a 4-neighbour in the original)
and the PSNR the reconstructions would have if every edge pixel were exact.
"""

from __future__ import annotations

import argparse
import collections
import json

import numpy as np


def edge_pixels(images: np.ndarray) -> np.ndarray:
    """bool [B, H, W]: pixels whose colour differs from a 4-neighbour's (both sides of an edge)."""
    diff_x = (images[:, :, 1:] != images[:, :, :-1]).any(-1)
    diff_y = (images[:, 1:] != images[:, :-1]).any(-1)
    edges = np.zeros(images.shape[:3], bool)
    edges[:, :, 1:] |= diff_x
    edges[:, :, :-1] |= diff_x
    edges[:, 1:] |= diff_y
    edges[:, :-1] |= diff_y
    return edges


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
            dist = [
                np.hypot(f["centre"][0] - obj["centre"][0], f["centre"][1] - obj["centre"][1]) for f in found
            ]
            read = found[int(np.argmin(dist))]["shape"]
            if read != obj["shape"]:
                wrong[f"{obj['shape']}->{read}"] += 1
    sq = ((recons.astype(np.float64) - originals) ** 2).sum(-1)  # per pixel, summed over RGB
    mse = sq.mean(axis=(1, 2)) / 3
    edges = edge_pixels(originals)
    edge_mse = np.where(edges, 0.0, sq).mean() / 3  # as if every edge pixel were exact
    return {
        "scenes": len(captions),
        "ceiling": passed / len(captions),
        "psnr_per_image_mean": float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10)))),
        "edge_pixels_per_image": float(edges.sum(axis=(1, 2)).mean()),
        "squared_error_share_at_edges": round(float(sq[edges].sum() / max(sq.sum(), 1e-10)), 3),
        "psnr_if_edges_exact": float(10 * np.log10(255.0**2 / max(edge_mse, 1e-10))),
        "objects": dict(objects),
        "wrong": dict(sorted(wrong.items())),
        "wrong_fraction": {
            s: round(sum(v for k, v in wrong.items() if k.startswith(s + "->")) / n, 3)
            for s, n in objects.items()
        },
    }


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
        recons = np.concatenate(
            [
                np.asarray(vae.decode(vae.encode(originals[i : i + args.batch_size])))
                for i in range(0, len(originals), args.batch_size)
            ]
        )
        row = shape_errors(originals, recons, [e["caption"] for e in examples])
        print(json.dumps({"split": split, "dvae_workdir": args.dvae_workdir, **row}), flush=True)


if __name__ == "__main__":
    main()
