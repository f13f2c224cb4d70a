"""Zero-shot classification of your own images against your own class names.

    python -m clip_jax.classify --workdir W --input_dir D --classnames_file F \\
        [--templates_file T] --out predictions.json

Every image file directly inside D is scored against the class names in F (one per line) using
the prompt templates in T (one per line, '{}' marks the class name; default: OpenAI's 7-template
subset; a set name such as `openai80` or `shapes` also works). Output:
`{file name: {"label": top-1 class name, "probs": {class name: probability}}}` with probabilities
softmax(100 * cosine similarity). Unreadable images are skipped with a message and counted.
Exit code 2: bad arguments, an empty class-name file, no (readable) images.
"""

from __future__ import annotations

import json
import sys
from typing import Iterable, Iterator

import numpy as np

from clip_jax import eval_common as ev
from clip_jax import zeroshot
from clip_jax.api import CLIPModel, read_clip_config
from core_jax import sharded_inference
from core_jax import storage
from core_jax.cli import ArgumentParser, fail
from core_jax.data.decode import IMAGE_EXTS, SkipExample, decode_image


def list_image_files(input_dir: str) -> list[str]:
    """Sorted names of the image files (by extension) directly inside `input_dir`."""
    if not storage.isdir(input_dir):
        raise ValueError(f"input directory not found: {input_dir}")
    names = [n for n in storage.files_in(input_dir) if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTS]
    if not names:
        patterns = ", ".join("*." + e for e in IMAGE_EXTS)
        raise ValueError(f"no image files ({patterns}) in {input_dir}")
    return names


def read_image_files(input_dir: str, names: list[str], skipped: dict, log=print):
    """Yields (name, uint8 [H, W, 3]); unreadable files are logged and counted in `skipped`."""
    for name in names:
        try:
            with storage.open(storage.join(input_dir, name), "rb") as f:
                data = f.read()
            # Any size is worth a prediction when a person asks for one: no minimum side.
            yield name, decode_image(data, min_side=1)
        except (SkipExample, OSError) as e:
            reason = getattr(e, "reason", "unreadable")
            skipped[reason] = skipped.get(reason, 0) + 1
            log(f"skipping {name}: {e}")


def chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def probabilities(image_emb: np.ndarray, class_weights: np.ndarray) -> np.ndarray:
    """softmax(100 * cos) over classes, [N, C], computed in float64 so it sums to 1."""
    logits = zeroshot.ZEROSHOT_LOGIT_SCALE * (
        np.asarray(image_emb, np.float64) @ np.asarray(class_weights, np.float64).T
    )
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=-1, keepdims=True)


def classify_images(model, named_images, classnames, templates, batch_size: int = 64) -> dict:
    """{name: {'label', 'probs'}} for (name, uint8 image) pairs, scored `batch_size` at a time."""
    weights = zeroshot.class_embeddings(model, classnames, templates)
    predictions = {}
    for chunk in chunks(named_images, batch_size):
        names, images = zip(*chunk)
        probs = probabilities(model.embed_images(list(images), batch_size=batch_size), weights)
        for name, p in zip(names, probs):
            predictions[name] = {
                "label": classnames[int(np.argmax(p))],
                "probs": {c: float(v) for c, v in zip(classnames, p)},
            }
    return predictions


def main(argv=None):
    parser = ArgumentParser(prog="python -m clip_jax.classify", description=__doc__.split("\n\n")[0])
    ev.add_weights_flags(parser)
    parser.add_argument("--input_dir", required=True, help="directory of images (not recursive)")
    parser.add_argument("--classnames_file", required=True, help="one class name per line")
    parser.add_argument(
        "--templates_file",
        default="subset7",
        help="one template per line with '{}', or openai80|subset7|shapes|photo",
    )
    parser.add_argument("--out", required=True, help="predictions JSON")
    parser.add_argument("--batch_size", type=int, default=64)
    sharded_inference.add_flags(parser)
    args = parser.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    # Everything checkable without the model is checked first: a typo should not cost a load.
    try:
        storage.check_reachable(args.workdir, args.input_dir, args.classnames_file, args.out)
        if args.batch_size <= 0:
            raise ValueError(f"--batch_size must be positive, got {args.batch_size}")
        classnames = ev.read_lines(args.classnames_file, "classnames")
        duplicates = sorted({c for c in classnames if classnames.count(c) > 1})
        if duplicates:
            raise ValueError(f"{args.classnames_file} lists {duplicates} more than once")
        templates = zeroshot.resolve_templates(args.templates_file)
        names = list_image_files(args.input_dir)
    except ValueError as e:
        fail(str(e))

    try:
        sharded_inference.start(args)  # several hosts embed as one job; before any device is used
        mesh = sharded_inference.choose_mesh(args, read_clip_config(args.workdir))
        model = CLIPModel.load(args.workdir, args.step, raw_weights=args.raw_weights, mesh=mesh)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    skipped = {}
    named_images = read_image_files(args.input_dir, names, skipped, log=log)
    predictions = classify_images(model, named_images, classnames, templates, args.batch_size)
    num_skipped = sum(skipped.values())
    if not predictions:
        fail(f"none of the {len(names)} image files in {args.input_dir} could be read")
    if not sharded_inference.is_writer():  # every process holds all predictions; one writes them
        return predictions
    with storage.open(args.out, "w") as f:
        json.dump(predictions, f, indent=1)
    log(
        f"classified {len(predictions)} images into {len(classnames)} classes "
        f"({len(templates)} templates); skipped {num_skipped} unreadable"
        + (f" {skipped}" if skipped else "")
        + f" -> {args.out}"
    )
    return predictions


def cli():
    """The console script: main returns its predictions to Python callers, the command exits 0 on success."""
    main()


if __name__ == "__main__":
    cli()
