"""Does a shapes dVAE know where an edge is to the pixel? Moves one object by one pixel (x, y) or
grows it by one (size), encodes both scenes, and reports whether the codes change and how close
the decoder's drawing comes to each scene on exactly the pixels that changed.

    python -m bench.dvae_shift_probe --dvae_workdir runs/demo/dvae \
        [--decoder_workdir runs/demo/dvae_decoder] [--num_scenes 400]

`--decoder_workdir` decodes with another dVAE's decoder (a fine-tuned one shares the encoder), so
the codes are the encoder's either way. Prints one JSON line per kind of move: `identical_codes`
(share of pairs whose whole code grids are equal: the decoder cannot tell those apart),
`tokens_changed` and `pixels_changed` per pair, and `edge_error`: on the changed pixels, the
reconstruction's distance from the scene it encodes over the distance between the two scenes,
averaged over both scenes of every pair (0: each edge drawn at its pixel; 0.5: halfway, a blur
over both positions; 1: drawn at the other scene's position).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

# Each kind of move as (dx, dy, dsize) in pixels, taken in turn scene by scene.
MOVES = {"x": (1, 0, 0), "y": (0, 1, 0), "size": (0, 0, 1)}


def moved_pairs(num_scenes: int, split: str = "test_unseen"):
    """(originals, moved, kinds): one-object scenes of `split` and a copy with the object moved by
    one pixel right ('x') or down ('y'), or one pixel larger ('size'), in turn; a move that would
    leave the image is skipped."""
    from core_jax.data import shapes

    originals, moved, kinds = [], [], []
    last = shapes.IMAGE_SIZE - 1
    for i in range(num_scenes):
        obj = shapes.make_example(split, i, 0, one_object_fraction=1.0)["objects"][0]
        (x0, y0), size = obj["bbox"][:2], obj["size"]
        kind = tuple(MOVES)[i % len(MOVES)]
        dx, dy, ds = MOVES[kind]
        x0, y0, size = x0 + dx, y0 + dy, size + ds
        if max(x0, y0) + size > last:
            continue
        other = dict(obj, bbox=(x0, y0, x0 + size, y0 + size), size=size)
        originals.append(shapes.render([obj]))
        moved.append(shapes.render([other]))
        kinds.append(kind)
    return np.stack(originals), np.stack(moved), np.array(kinds)


def edge_error(recon: np.ndarray, target: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Per pair: on pixels where `target` and `other` differ, |recon - target| / |other - target|."""
    recon, target, other = (a.astype(np.float64) for a in (recon, target, other))
    gap = np.linalg.norm(other - target, axis=-1)
    changed = gap > 0
    dist = np.linalg.norm(recon - target, axis=-1) / np.where(changed, gap, 1.0)
    return (dist * changed).sum(axis=(1, 2)) / np.maximum(changed.sum(axis=(1, 2)), 1)


def probe(vae, decoder, num_scenes: int) -> list[dict]:
    originals, moved, kinds = moved_pairs(num_scenes)
    codes_a, codes_b = np.asarray(vae.encode(originals)), np.asarray(vae.encode(moved))
    recon_a, recon_b = np.asarray(decoder.decode(codes_a)), np.asarray(decoder.decode(codes_b))
    error = (edge_error(recon_a, originals, moved) + edge_error(recon_b, moved, originals)) / 2
    tokens_changed = (codes_a != codes_b).reshape(len(kinds), -1).sum(1)
    rows = []
    for kind in MOVES:
        m = kinds == kind
        rows.append(
            {
                "move": kind,
                "pairs": int(m.sum()),
                "identical_codes": round(float((tokens_changed[m] == 0).mean()), 3),
                "tokens_changed": round(float(tokens_changed[m].mean()), 2),
                "pixels_changed": round(float(np.any(originals[m] != moved[m], -1).sum((1, 2)).mean()), 1),
                "edge_error": round(float(error[m].mean()), 3),
            }
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dvae_workdir", required=True)
    parser.add_argument("--decoder_workdir", default="", help="decode with this dVAE (default: the same)")
    parser.add_argument("--num_scenes", type=int, default=400)
    args = parser.parse_args(argv)
    if args.num_scenes < len(MOVES):
        parser.error(f"--num_scenes must be >= {len(MOVES)} (one scene per kind of move)")
    from dalle_jax.dvae_api import DVAE

    vae = DVAE.load(args.dvae_workdir)
    decoder = DVAE.load(args.decoder_workdir) if args.decoder_workdir else vae
    if (decoder.grid_size, decoder.vocab_size) != (vae.grid_size, vae.vocab_size):
        parser.error("--decoder_workdir has another grid or codebook than --dvae_workdir")
    for row in probe(vae, decoder, args.num_scenes):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
