"""Reconstruct a folder of images through a dVAE and report PSNR.

    python -m dalle_jax.reconstruct --workdir W --input_dir D --out_dir O

Every PNG/JPEG in D is resized (shorter side) and centre-cropped to the model's input size, encoded
to tokens, decoded, and written to O as a PNG under the same name (foo.jpg -> foo.png; when two
inputs share a stem the full name is kept, foo.jpg -> foo.jpg.png). PSNR compares the reconstruction
with the resized/cropped input. Unreadable files are skipped and counted; an empty folder is an
error (exit 2).
"""

from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image

from core_jax import sharded_inference, storage
from core_jax.checkpoint import read_config
from core_jax.cli import ArgumentParser, fail
from core_jax.data import image_ops
from dalle_jax.dvae_api import DVAE

EXTENSIONS = (".png", ".jpg", ".jpeg")


def parse_args(argv=None):
    parser = ArgumentParser(
        prog="python -m dalle_jax.reconstruct",
        description="Reconstruct a folder of images through a dVAE; report PSNR.",
    )
    parser.add_argument("--workdir", required=True, help="dVAE workdir (from train_dvae or convert_dvae).")
    parser.add_argument("--input_dir", required=True, help="Folder of PNG/JPEG images.")
    parser.add_argument(
        "--out_dir", required=True, help="Where reconstructions are written (created if missing)."
    )
    parser.add_argument("--batch_size", type=int, default=16, help="Images per encode/decode call.")
    parser.add_argument(
        "--raw_weights",
        action="store_true",
        help="Load the raw trained weights, not their EMA (used by default when the run kept one).",
    )
    sharded_inference.add_flags(parser)
    args = parser.parse_args(argv)
    if args.batch_size <= 0:
        fail(f"--batch_size must be positive, got {args.batch_size}")
    return args


def list_images(input_dir: str) -> list[str]:
    if not storage.isdir(input_dir):
        raise FileNotFoundError(f"--input_dir {input_dir} is not a directory")
    return [f for f in storage.files_in(input_dir) if f.lower().endswith(EXTENSIONS)]


def output_names(files: list[str]) -> dict[str, str]:
    stems = {}
    for f in files:
        stems.setdefault(os.path.splitext(f)[0], []).append(f)
    return {
        f: (os.path.splitext(f)[0] if len(stems[os.path.splitext(f)[0]]) == 1 else f) + ".png" for f in files
    }


def read_image(path: str, size: int) -> np.ndarray:

    with storage.open(path, "rb") as f, Image.open(f) as img:
        img = image_ops.exif_transpose(img)
        img.load()
        rgb = image_ops.pil_to_rgb(img)
    return image_ops.resize_and_crop(rgb, size)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) / 255.0 - b.astype(np.float64) / 255.0) ** 2)
    return float(-10.0 * np.log10(max(mse, 1e-10)))


def reconstruct_folder(
    vae, input_dir: str, out_dir: str, batch_size: int = 16, log=print, write: bool = True
) -> dict:
    """Returns {'written': n, 'skipped': n, 'mean_psnr': dB}; `write` False: the figures only (the
    processes of a multi-host run other than the one that writes)."""

    files = list_images(input_dir)
    if not files:
        raise FileNotFoundError(f"--input_dir {input_dir} holds no PNG or JPEG images")
    names = output_names(files)
    loaded, skipped, scores = [], 0, []

    def flush():
        if not loaded:
            return
        batch = np.stack([img for _, img in loaded])
        rec = np.asarray(vae.decode(vae.encode(batch)))
        scores.extend(psnr(img, out) for (_, img), out in zip(loaded, rec))
        if write:
            storage.makedirs(out_dir)  # here: a folder with no readable image writes nothing
            for (name, _), out in zip(loaded, rec):
                storage.write_png(storage.join(out_dir, names[name]), out)
        loaded.clear()

    for name in files:
        try:
            img = read_image(storage.join(input_dir, name), vae.image_size)
        except Exception as e:  # PIL raises many types for broken files
            skipped += 1
            log(f"skipping {name}: cannot read it as an image ({type(e).__name__}: {e})")
            continue
        loaded.append((name, img))
        if len(loaded) == batch_size:
            flush()
    flush()
    if not scores:
        raise FileNotFoundError(
            f"--input_dir {input_dir}: none of its {len(files)} image files could be read"
        )
    return {"written": len(scores), "skipped": skipped, "mean_psnr": float(np.mean(scores))}


def main(argv=None):
    args = parse_args(argv)
    try:
        storage.check_reachable(args.workdir, args.input_dir, args.out_dir)
        files = list_images(args.input_dir)
        if not files:
            fail(f"--input_dir {args.input_dir} holds no PNG or JPEG images")
        sharded_inference.start(args)  # several hosts reconstruct as one job; before any device is used
        mesh = sharded_inference.choose_mesh(args, read_config(args.workdir))
        vae = DVAE.load(args.workdir, raw_weights=args.raw_weights, mesh=mesh)
        write = sharded_inference.is_writer()
        result = reconstruct_folder(vae, args.input_dir, args.out_dir, args.batch_size, write=write)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    print(
        f"reconstructed {result['written']} images into {args.out_dir} "
        f"({result['skipped']} skipped); mean PSNR {result['mean_psnr']:.2f} dB",
        flush=True,
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
