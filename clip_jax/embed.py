"""L2-normalised CLIP embeddings of a directory of images and/or a file of texts, as one .npz.

    python -m clip_jax.embed --workdir W [--input_dir D] [--texts_file F] --out E.npz

Writes `image_embeddings` [N, E] float32 with `image_files` (names, same order) and/or
`text_embeddings` [M, E] with `texts` (the non-blank lines of F). For retrieval indexes and for
checking converted weights against a reference: images already at the model's resolution are
only normalised, never resampled. Unreadable images are skipped with a message and counted.
Exit code 2: neither --input_dir nor --texts_file, an empty directory or texts file.
"""

from __future__ import annotations

import sys

import numpy as np

from clip_jax import eval_common as ev
from clip_jax.api import CLIPModel, read_clip_config
from clip_jax.classify import chunks, list_image_files, read_image_files
from core_jax import sharded_inference, storage
from core_jax.cli import ArgumentParser, fail


def embed_image_files(model, input_dir: str, names: list[str], batch_size: int = 64, log=print):
    """(embeddings [N, E], names kept, skip counts by reason)."""
    skipped, kept, out = {}, [], []
    for chunk in chunks(read_image_files(input_dir, names, skipped, log=log), batch_size):
        kept.extend(name for name, _ in chunk)
        out.append(model.embed_images([image for _, image in chunk], batch_size=batch_size))
    emb = np.concatenate(out) if out else np.zeros((0, model.embed_dim), np.float32)
    return emb.astype(np.float32), kept, skipped


def main(argv=None):
    parser = ArgumentParser(prog="python -m clip_jax.embed", description=__doc__.split("\n\n")[0])
    ev.add_weights_flags(parser)
    parser.add_argument("--input_dir", default="", help="directory of images (not recursive)")
    parser.add_argument("--texts_file", default="", help="one text per line")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--batch_size", type=int, default=64)
    sharded_inference.add_flags(parser)
    args = parser.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    if not args.input_dir and not args.texts_file:
        fail("give --input_dir (images), --texts_file (one text per line), or both")
    try:
        storage.check_reachable(args.workdir, args.input_dir, args.texts_file, args.out)
        if args.batch_size <= 0:
            raise ValueError(f"--batch_size must be positive, got {args.batch_size}")
        names = list_image_files(args.input_dir) if args.input_dir else []
        texts = ev.read_lines(args.texts_file, "texts") if args.texts_file else []
    except ValueError as e:
        fail(str(e))

    try:
        sharded_inference.start(args)  # several hosts embed as one job; before any device is used
        mesh = sharded_inference.choose_mesh(args, read_clip_config(args.workdir))
        model = CLIPModel.load(args.workdir, args.step, raw_weights=args.raw_weights, mesh=mesh)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    arrays, summary = {}, []
    if names:
        emb, kept, skipped = embed_image_files(model, args.input_dir, names, args.batch_size, log)
        if not kept:
            fail(f"none of the {len(names)} image files in {args.input_dir} could be read")
        arrays["image_embeddings"], arrays["image_files"] = emb, np.asarray(kept)
        summary.append(f"{len(kept)} images (skipped {sum(skipped.values())} unreadable)")
    if texts:
        arrays["text_embeddings"] = model.embed_texts(texts).astype(np.float32)
        arrays["texts"] = np.asarray(texts)
        summary.append(f"{len(texts)} texts")
    if not sharded_inference.is_writer():  # every process holds all embeddings; one writes them
        return arrays
    with storage.open(args.out, "wb") as f:  # a file object keeps np.savez from appending '.npz'
        np.savez(f, **arrays)
    log(f"embedded {' and '.join(summary)} (dim {model.embed_dim}) -> {args.out}")
    return arrays


def cli():
    """The console script: main returns its arrays to Python callers, the command exits 0 on success."""
    main()


if __name__ == "__main__":
    cli()
