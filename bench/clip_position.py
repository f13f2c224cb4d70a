"""Whether a shapes CLIP's image embedding keeps where the object is.

    python -m bench.clip_position --clip_workdir CW [CW ...] [--quick] [--out position.json]

Shapes captions name the place of a one-object scene ("a red circle in the top left"), and an
unCLIP decoder can put an object only where the embedding says. Two measurements per CLIP, on
one-object scenes (data seed 1):
  position_caption   each image against the 5 captions of its own colour and shape, one per
                     position: the share whose own caption scores highest (chance 0.2), on
                     300 test_seen and 300 test_unseen scenes.
  probe              a ridge regression from the image embeddings of 2000 one-object train scenes
                     to the object's centre, its mean error on 300 test_seen scenes (64x64 pixels)
                     against always answering the mean centre (bench_unclip's position_probe).
A CLIP that lost the place scores near 0.2 and probes near the mean centre's error.
"""

from __future__ import annotations

import json
import os

import numpy as np

from bench import common
from core_jax.cli import ArgumentParser, fail
from core_jax.data import shapes

PRESETS = {
    "full": dict(captions=300, probe_train=2000, probe_test=300),
    "quick": dict(captions=4, probe_train=16, probe_test=4),
}
CAPTION_SPLITS = ("test_seen", "test_unseen")
DATA_SEED = 1
# Embeddings are unit vectors; a weak ridge penalty only guards the solve.
PROBE_RIDGE = 1e-2


def one_object_scenes(split: str, count: int, seed: int) -> list[dict]:
    """Scenes 0 .. count - 1 of `split` with the kind forced to one object."""
    return [shapes.make_example(split, i, seed, one_object_fraction=1.0) for i in range(count)]


def images_of(scenes) -> np.ndarray:
    return np.stack([s["image"] for s in scenes])


def brightness_centres(x) -> np.ndarray:
    """float [N, 2] (x, y) in pixels: the centre of each image's (brightest channel + 1)^2, for
    images in [-1, 1] of an object on a black background; blurred predictions still count."""
    weight = np.square(np.clip(np.asarray(x, np.float64).max(-1) + 1.0, 0.0, None)) + 1e-12
    ys, xs = np.mgrid[: weight.shape[1], : weight.shape[2]]
    total = weight.sum(axis=(1, 2))
    return np.stack([(weight * xs).sum(axis=(1, 2)) / total, (weight * ys).sum(axis=(1, 2)) / total], -1)


def position_probe(embed_images, n_train: int, n_test: int, data_seed: int = DATA_SEED) -> dict:
    """`embed_images(uint8 [N, 64, 64, 3]) -> [N, E]`: the ridge probe's mean error (pixels) on
    `n_test` test_seen scenes against always answering the mean train centre."""

    def embeddings_and_centres(split, n, seed):
        images = images_of(one_object_scenes(split, n, seed))
        z = np.asarray(embed_images(images), np.float64)
        return z, brightness_centres(images.astype(np.float32) / 127.5 - 1.0)

    z_train, c_train = embeddings_and_centres("train", n_train, 0)
    z_test, c_test = embeddings_and_centres("test_seen", n_test, data_seed)
    x = np.concatenate([z_train, np.ones((n_train, 1))], axis=1)
    w = np.linalg.solve(x.T @ x + PROBE_RIDGE * np.eye(x.shape[1]), x.T @ c_train)
    predicted = np.concatenate([z_test, np.ones((n_test, 1))], axis=1) @ w
    return {
        "train_scenes": n_train,
        "test_scenes": n_test,
        "probe_px": float(np.linalg.norm(predicted - c_test, axis=-1).mean()),
        "mean_centre_px": float(np.linalg.norm(c_train.mean(0) - c_test, axis=-1).mean()),
    }


def position_caption_accuracy(clip, split: str, count: int, data_seed: int = DATA_SEED) -> float:
    """The share of `count` one-object scenes whose image scores its own caption highest among the
    5 captions of its colour and shape (one per position)."""
    scenes = one_object_scenes(split, count, data_seed)
    images = clip.embed_images(images_of(scenes))
    captions = [shapes.caption_for(s["objects"], position=p) for s in scenes for p in shapes.POSITIONS]
    texts = clip.embed_texts(captions).reshape(count, len(shapes.POSITIONS), -1)
    chosen = np.einsum("nd,npd->np", images, texts).argmax(-1)
    truth = np.array([shapes.POSITIONS.index(s["position"]) for s in scenes])
    return float((chosen == truth).mean())


def measure(clip_workdir: str, size: str = "full") -> dict:
    from clip_jax.api import CLIPModel  # the import compiles nothing; keeps --help fast

    counts = PRESETS[size]
    clip = CLIPModel.load(clip_workdir)
    out = {"clip_workdir": clip_workdir, "size": size}
    for split in CAPTION_SPLITS:
        out[f"position_caption/{split}"] = position_caption_accuracy(clip, split, counts["captions"])
    out["probe"] = position_probe(clip.embed_images, counts["probe_train"], counts["probe_test"])
    return out


def markdown(rows: list[dict]) -> str:
    lines = [
        "| CLIP | position caption, test_seen / test_unseen (chance 0.2) | probe / mean centre (px) |",
        "| --- | --- | --- |",
    ]
    for r in rows:
        p = r["probe"]
        lines.append(
            f"| `{r['clip_workdir']}` | {r['position_caption/test_seen']:.3f} / "
            f"{r['position_caption/test_unseen']:.3f} | {p['probe_px']:.2f} / {p['mean_centre_px']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = ArgumentParser(prog="python -m bench.clip_position", description=__doc__.split("\n\n")[0])
    p.add_argument("--clip_workdir", nargs="+", required=True, help="one or more shapes CLIP workdirs")
    p.add_argument("--quick", action="store_true", help="a few scenes (a smoke run)")
    p.add_argument("--out", default=None, help="results JSON")
    args = p.parse_args(argv)
    for path in args.clip_workdir:
        if not os.path.isdir(path):
            fail(f"--clip_workdir not found: {path}")
    try:
        rows = [measure(path, "quick" if args.quick else "full") for path in args.clip_workdir]
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "machine": common.machine_info()}, f, indent=1, default=str)
    return rows


if __name__ == "__main__":
    main()
