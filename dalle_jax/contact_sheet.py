"""One picture of a `generate --prompts_file` run: per caption, its images best first, with the
shapes checker's verdict (what the README shows for `make demo`).

    python -m dalle_jax.contact_sheet --samples_dir runs/demo/samples --out sheet.png

Reads SAMPLES_DIR/prompts.json and SAMPLES_DIR/NNN/000.png, 001.png, ... (the layout `generate`
writes). Shapes captions are scored with the checker and marked seen / held-out (colour-shape
pairs never in training); other captions are shown without a verdict.
"""

from __future__ import annotations

import io
import json
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from core_jax import storage
from core_jax.cli import ArgumentParser
from core_jax.data import shapes
from core_jax.data.shapes_checker import fidelity
from core_jax.errors import ConfigError

TEXT_WIDTH, PAD = 330, 6


def caption_verdict(caption: str, images: list[np.ndarray]) -> str:
    try:
        parsed = shapes.parse_caption(caption)
    except ValueError:
        return ""  # not a shapes caption: nothing to check it against
    pairs = [(o["colour"], o["shape"]) for o in parsed["objects"]]
    held_out = [p for p in pairs if p in shapes.HELD_OUT_PAIRS]
    kind = "held-out pair" if held_out else "seen pairs"
    passed = sum(int(fidelity(im, parsed)) for im in images)
    return f"{kind}; checker passes {passed} of {len(images)}"


def read_run(samples_dir: str) -> list[tuple[str, list[np.ndarray]]]:
    index = storage.join(samples_dir, "prompts.json")
    if not storage.isfile(index):
        raise FileNotFoundError(
            f"{index} not found: pass the --out_dir of a "
            f"`python -m dalle_jax.generate --prompts_file ...` run"
        )
    prompts = json.loads(storage.read_text(index))
    rows = []
    for key in sorted(prompts):
        folder = storage.join(samples_dir, key)
        files = [n for n in storage.files_in(folder) if n[:-4].isdigit() and n.endswith(".png")]
        if not files:
            raise FileNotFoundError(f"{folder} holds no NNN.png images")
        rows.append(
            (
                prompts[key],
                [
                    np.asarray(
                        Image.open(io.BytesIO(storage.read_bytes(storage.join(folder, n)))).convert("RGB")
                    )
                    for n in files
                ],
            )
        )
    return rows


def contact_sheet(rows: list[tuple[str, list[np.ndarray]]], scale: int = 2) -> Image.Image:
    """rows: (caption, images best first); the images are shown `scale` times larger (nearest)."""
    size = max(im.shape[0] for _, ims in rows for im in ims) * scale
    cols = max(len(ims) for _, ims in rows)
    sheet = Image.new("RGB", (TEXT_WIDTH + cols * (size + PAD), len(rows) * (size + PAD) + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=13)
    for r, (caption, images) in enumerate(rows):
        top = PAD + r * (size + PAD)
        draw.text((8, top + size // 2 - 18), caption, fill="black", font=font)
        draw.text((8, top + size // 2 + 4), caption_verdict(caption, images), fill="gray", font=small)
        for c, im in enumerate(images):
            tile = Image.fromarray(im).resize((size, size), Image.NEAREST)
            sheet.paste(tile, (TEXT_WIDTH + c * (size + PAD), top))
    return sheet


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples_dir", required=True, help="--out_dir of a generate --prompts_file run")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--scale", type=int, default=2, help="upscaling of each image (nearest)")
    args = p.parse_args(argv)
    try:
        storage.check_reachable(args.samples_dir, args.out)
        rows = read_run(args.samples_dir)
    except (FileNotFoundError, json.JSONDecodeError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    storage.write_png(args.out, contact_sheet(rows, args.scale))
    print(f"wrote {args.out} ({len(rows)} captions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
