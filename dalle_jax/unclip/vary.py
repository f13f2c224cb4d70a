"""Variations, interpolations, text diffs and inpainting of your images with a trained unCLIP
decoder (Ramesh et al. 2022, section 3).

    python -m dalle_jax.unclip.vary --decoder_workdir DW [--upsampler_workdir UW] --input_dir IN \\
        --num_samples 4 [--interpolate A.png B.png --frames 8] [--inpaint_box x0,y0,x1,y1] \\
        [--text_diff "OLD CAPTION" "NEW CAPTION" --strength 0.5 --frames 8 [--image X.png]] \\
        [--sampler ddim|dpmpp|ddpm --steps N --cond_scale S --eta E --seed K] --out_dir OUT

- variations (the default): every image of IN is CLIP-embedded, DDIM-inverted to its start noise
  (--fresh_noise: fresh noise instead) and decoded --num_samples times with DDIM at eta > 0;
  writes OUT/<name>/000.png ... and OUT/<name>/grid.png (the input, then its samples).
- --interpolate A B: --frames images from A to B, slerping the two CLIP embeddings and the two
  inverted noises (section 3.2); names not found as given are looked up in --input_dir. Writes
  OUT/interpolate/000.png ... and strip.png (A, the frames, B in one row).
- --text_diff OLD NEW: one image (--image, else the only image of --input_dir), described by OLD,
  edited toward NEW (section 3.3): its CLIP embedding is slerped toward normalize(z_NEW - z_OLD) by
  theta = 0 .. --strength over --frames frames, each decoded from the image's inverted noise with
  the NEW caption (--no_decoder_caption: none). Writes OUT/text_diff/000.png (theta 0: the image
  redrawn) ... and strip.png (the image, then the frames).
- --inpaint_box x0,y0,x1,y1: in every image of IN the box (input pixels, x1 / y1 exclusive) is
  redrawn under the image's CLIP embedding and the rest kept; OUT/<name>/ as for variations.
--upsampler_workdir takes every output to the upsampler's size. OUT/settings.json records every
setting, the workdirs and their checkpoint steps. Bad input: one `error:` line, exit 2, nothing
written.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from core_jax import storage
from core_jax.checkpoint import latest_step
from core_jax.cli import ArgumentParser, fail
from core_jax.data.decode import SkipExample, decode_image
from core_jax.errors import ConfigError
from core_jax.metrics import image_grid
from dalle_jax.unclip import uses
from dalle_jax.unclip.api import Decoder, Upsampler

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SAMPLERS = ("ddim", "dpmpp", "ddpm")
INTERPOLATE_DIR = "interpolate"
TEXT_DIFF_DIR = "text_diff"
MODE_FLAGS = {"interpolate": "--interpolate", "inpaint": "--inpaint_box", "text_diff": "--text_diff"}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m dalle_jax.unclip.vary", description=__doc__.split("\n\n")[0])
    p.add_argument("--decoder_workdir", required=True, help="trained unCLIP decoder workdir")
    p.add_argument("--upsampler_workdir", default=None, help="upsampler taking the decoder's output larger")
    p.add_argument(
        "--clip_workdir", default=None, help="the decoder's CLIP, when it moved (default: its config's)"
    )
    p.add_argument("--input_dir", default=None, help="folder of images (png, jpg, webp, ...), any size")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--num_samples", type=int, default=4, help="samples per input image")
    p.add_argument("--interpolate", nargs=2, metavar=("A", "B"), default=None, help="interpolate A to B")
    p.add_argument(
        "--frames",
        type=int,
        default=uses.FRAMES,
        help="frames of an interpolation or a text diff, both ends included",
    )
    p.add_argument("--inpaint_box", default=None, help="x0,y0,x1,y1 in input pixels (x1, y1 exclusive)")
    p.add_argument(
        "--text_diff",
        nargs=2,
        metavar=("OLD", "NEW"),
        default=None,
        help="edit one image described by caption OLD toward caption NEW",
    )
    p.add_argument(
        "--strength",
        type=float,
        default=None,
        help=f"text diff: the largest slerp fraction theta, in (0, 1] (default {uses.TEXT_DIFF_STRENGTH})",
    )
    p.add_argument(
        "--image", default=None, help="text diff: the image (default: the only one in --input_dir)"
    )
    p.add_argument(
        "--no_decoder_caption",
        action="store_true",
        help="text diff: the decoder reads no caption (default: the new one), so only the embedding edits",
    )
    p.add_argument("--fresh_noise", action="store_true", help="start from fresh noise, not the inverted one")
    p.add_argument("--sampler", choices=SAMPLERS, default=uses.VARIATION_SAMPLER)
    p.add_argument("--steps", type=int, default=uses.VARIATION_STEPS, help="sampling (and inversion) steps")
    p.add_argument("--cond_scale", type=float, default=1.0, help="classifier-free guidance; 1 = none")
    p.add_argument(
        "--eta",
        type=float,
        default=None,
        help=f"ddim noise in [0, 1]; default {uses.VARIATION_ETA} for variations, 0 for interpolations "
        f"and text diffs (the ends redraw the images), {uses.INPAINT_ETA} for inpainting",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="decoder checkpoint step (default: newest)")
    p.add_argument(
        "--raw_weights", action="store_true", help="load raw trained weights, not the EMA (default when kept)"
    )
    return p


def parse_box(text: str) -> tuple[int, int, int, int]:
    try:
        box = tuple(int(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise ValueError(f"--inpaint_box must be four integers x0,y0,x1,y1, got {text!r}")
    return box


def check_text_diff_args(args, mode: str) -> None:
    """The text diff's own flags: used only with --text_diff, two different non-empty captions, a
    strength in (0, 1]."""
    if mode != "text_diff":
        for flag, given in (
            ("--strength", args.strength is not None),
            ("--image", args.image is not None),
            ("--no_decoder_caption", args.no_decoder_caption),
        ):
            if given:
                raise ValueError(f"{flag} is for --text_diff only")
        return
    if not args.input_dir and not args.image:
        raise ValueError("--text_diff needs --image or an --input_dir holding one image")
    old, new = args.text_diff
    for which, caption in (("old", old), ("new", new)):
        if not caption.strip():
            raise ValueError(f"--text_diff: the {which} caption is empty")
    if " ".join(old.split()) == " ".join(new.split()):
        raise ValueError(f"--text_diff: the two captions are the same ({old!r}): nothing to edit toward")
    strength = text_diff_strength(args)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"--strength must be in (0, 1], got {strength}")


def check_args(args) -> str:
    """The mode (variations | interpolate | inpaint | text_diff) from the arguments alone, before
    any file is read."""
    chosen = [mode for mode, flag in MODE_FLAGS.items() if getattr(args, flag[2:]) is not None]
    if len(chosen) > 1:
        raise ValueError(f"choose one of {', '.join(MODE_FLAGS[m] for m in chosen)}, not several")
    mode = chosen[0] if chosen else "variations"
    if mode in ("variations", "inpaint") and not args.input_dir:
        raise ValueError(f"{mode} needs --input_dir")
    check_text_diff_args(args, mode)
    if args.num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {args.num_samples}")
    if args.frames < 2:
        raise ValueError(f"--frames must be >= 2 (both ends included), got {args.frames}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.cond_scale < 0:
        raise ValueError(f"--cond_scale must be >= 0 (1 = unguided), got {args.cond_scale}")
    if args.eta is not None:
        if not 0.0 <= args.eta <= 1.0:
            raise ValueError(f"--eta must be in [0, 1], got {args.eta}")
        if args.eta and args.sampler != "ddim":
            raise ValueError(f"--eta is for --sampler ddim only, got --sampler {args.sampler}")
    if mode == "inpaint":
        parse_box(args.inpaint_box)
    return mode


def default_eta(mode: str, sampler: str) -> float:
    if sampler != "ddim":
        return 0.0
    return {
        "variations": uses.VARIATION_ETA,
        "interpolate": 0.0,
        "inpaint": uses.INPAINT_ETA,
        "text_diff": 0.0,
    }[mode]


def read_image(path: str) -> np.ndarray:
    try:
        with storage.open(path, "rb") as f:
            return decode_image(f.read(), min_side=1)
    except (OSError, SkipExample) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def read_input_dir(input_dir: str) -> list[tuple[str, str, np.ndarray]]:
    """(name, path, uint8 image) for every image file of the folder, sorted by file name; the
    name (the file name without extension) is the image's output folder."""
    if not storage.isdir(input_dir):
        raise ValueError(f"--input_dir not found: {input_dir}")
    files = [f for f in storage.files_in(input_dir) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise ValueError(f"--input_dir {input_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    names = [os.path.splitext(f)[0] for f in files]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(
            f"--input_dir {input_dir}: two images share the name {twice[0]!r} (one output folder each)"
        )
    return [
        (n, storage.join(input_dir, f), read_image(storage.join(input_dir, f))) for n, f in zip(names, files)
    ]


def find_named_images(names, input_dir: str | None, flag: str) -> list[tuple[str, str, np.ndarray]]:
    """(name, path, uint8 image) per file name; a name not found as given is looked up in input_dir."""
    found = []
    for name in names:
        path = name
        if not storage.isfile(path) and input_dir and storage.isfile(storage.join(input_dir, name)):
            path = storage.join(input_dir, name)
        if not storage.isfile(path):
            where = f" (nor in --input_dir {input_dir})" if input_dir else ""
            raise ValueError(f"{flag}: {name} not found{where}")
        found.append((os.path.splitext(storage.basename(path))[0], path, read_image(path)))
    return found


def find_text_diff_image(args) -> list[tuple[str, str, np.ndarray]]:
    """[(name, path, image)]: --image, else the one image of --input_dir."""
    if args.image:
        return find_named_images([args.image], args.input_dir, "--image")
    inputs = read_input_dir(args.input_dir)
    if len(inputs) > 1:
        raise ValueError(
            f"--text_diff edits one image but --input_dir {args.input_dir} holds {len(inputs)}: "
            "name one with --image"
        )
    return inputs


def load_models(args, decoder=None, upsampler=None):
    """The decoder (with its CLIP) and the upsampler of the arguments, unless given already."""
    for flag in ("decoder_workdir", "upsampler_workdir", "clip_workdir"):
        path = getattr(args, flag)
        if path and not storage.isdir(path):
            raise ValueError(f"--{flag} not found: {path}")
    if decoder is None:
        decoder = Decoder.load(
            args.decoder_workdir, args.step, raw_weights=args.raw_weights, clip_workdir=args.clip_workdir
        )
    if upsampler is None and args.upsampler_workdir:
        upsampler = Upsampler.load(args.upsampler_workdir, raw_weights=args.raw_weights)
    uses.check_upsampler(decoder, upsampler)
    timesteps = decoder.schedule.num_train_steps
    if args.steps > timesteps:
        raise ValueError(f"--steps must be <= the decoder's {timesteps} diffusion steps, got {args.steps}")
    return decoder, upsampler


def workdir_steps(args, decoder, upsampler) -> dict:
    """Which checkpoints made the images: each workdir and its step."""

    def step_of(workdir, step=None):
        return int(step) if step is not None else latest_step(workdir)

    clip_workdir = args.clip_workdir or str(decoder.config.clip_workdir)
    out = {
        "decoder_workdir": storage.absolute(args.decoder_workdir),
        "decoder_step": step_of(args.decoder_workdir, args.step),
        "clip_workdir": storage.absolute(clip_workdir),
        "clip_step": step_of(clip_workdir, None if args.clip_workdir else int(decoder.config.clip_step)),
        "upsampler_workdir": None,
        "upsampler_step": None,
    }
    if upsampler is not None and args.upsampler_workdir:
        out.update(
            upsampler_workdir=storage.absolute(args.upsampler_workdir),
            upsampler_step=step_of(args.upsampler_workdir),
        )
    return out


def run_variations(decoder, upsampler, inputs, args, sampling) -> dict:
    """name -> (samples uint8 [K, H, W, 3], the input shown beside them)."""
    out = {}
    for name, _, image in inputs:
        samples = uses.variations(
            decoder, image[None], args.num_samples, invert=not args.fresh_noise, **sampling
        )
        out[name] = uses.upsample(upsampler, samples[0], seed=args.seed)
    return out


def run_inpaint(decoder, upsampler, inputs, args, sampling, masks) -> dict:
    out = {}
    for name, _, image in inputs:
        samples = uses.inpaint(decoder, image[None], masks[name][None], args.num_samples, **sampling)
        out[name] = uses.upsample(upsampler, samples[0], seed=args.seed)
    return out


def run_interpolate(decoder, upsampler, ends, args, sampling) -> np.ndarray:
    (_, _, a), (_, _, b) = ends
    frames = uses.interpolate(decoder, a, b, args.frames, invert=not args.fresh_noise, **sampling)
    return uses.upsample(upsampler, frames, seed=args.seed)


def run_text_diff(decoder, upsampler, inputs, args, sampling) -> np.ndarray:
    (_, _, image), (old, new) = inputs[0], args.text_diff
    frames = uses.text_diff(
        decoder,
        image,
        old,
        new,
        strength=text_diff_strength(args),
        frames=args.frames,
        decoder_caption=not args.no_decoder_caption,
        invert=not args.fresh_noise,
        **sampling,
    )
    return uses.upsample(upsampler, frames, seed=args.seed)


def text_diff_strength(args) -> float:
    return uses.TEXT_DIFF_STRENGTH if args.strength is None else float(args.strength)


def text_diff_settings(args) -> dict:
    """What settings.json records of a text diff (None in other modes)."""
    if args.text_diff is None:
        return dict(old_caption=None, new_caption=None, strength=None, decoder_caption=None, thetas=None)
    old, new = args.text_diff
    strength = text_diff_strength(args)
    return dict(
        old_caption=old,
        new_caption=new,
        strength=strength,
        decoder_caption=None if args.no_decoder_caption else new,
        thetas=[round(float(t), 6) for t in uses.text_diff_fractions(strength, args.frames)],
    )


def write_samples(folder: str, samples: np.ndarray, before: list, after: list, grid_name: str) -> list:
    """NNN.png per sample and one sheet: the `before` images, the samples, the `after` images
    (in one row for a strip)."""
    storage.makedirs(folder)
    files = []
    for i, image in enumerate(samples):
        files.append(f"{i:03d}.png")
        storage.write_png(storage.join(folder, files[-1]), image)
    size = samples.shape[1]
    shown = [uses.display_view(s, size)[None] for s in before] + [samples]
    shown += [uses.display_view(s, size)[None] for s in after]
    one_row = grid_name == "strip.png"
    storage.write_png(
        storage.join(folder, grid_name), image_grid(np.concatenate(shown), rows=1 if one_row else None)
    )
    return files


def main(argv=None, *, decoder=None, upsampler=None) -> dict:
    """The command; `decoder` / `upsampler` (already loaded from the workdirs) skip loading, for
    notebooks and tests that call it many times. Returns the settings it wrote."""
    args = build_parser().parse_args(argv)
    try:
        storage.check_reachable(
            args.out_dir, args.input_dir, args.decoder_workdir, args.upsampler_workdir, args.clip_workdir
        )
        mode = check_args(args)
        if mode == "interpolate":
            inputs = find_named_images(args.interpolate, args.input_dir, "--interpolate")
        elif mode == "text_diff":
            inputs = find_text_diff_image(args)
        else:
            inputs = read_input_dir(args.input_dir)
        box = parse_box(args.inpaint_box) if mode == "inpaint" else None
        for _, path, image in inputs if box else ():
            uses.check_box(box, *image.shape[:2], what=path)
        decoder, upsampler = load_models(args, decoder, upsampler)
        masks = {name: uses.box_mask(image.shape[:2], box, decoder) for name, _, image in inputs if box}
        if mode == "text_diff":
            uses.caption_direction(decoder, *args.text_diff)  # empty, over-long or same captions
    except (ValueError, FileNotFoundError, ConfigError) as e:
        fail(str(e))

    eta = default_eta(mode, args.sampler) if args.eta is None else args.eta
    sampling = dict(
        sampler=args.sampler, steps=args.steps, cond_scale=args.cond_scale, eta=eta, seed=args.seed
    )
    start = time.perf_counter()
    if mode == "interpolate":
        results = {INTERPOLATE_DIR: run_interpolate(decoder, upsampler, inputs, args, sampling)}
    elif mode == "text_diff":
        results = {TEXT_DIFF_DIR: run_text_diff(decoder, upsampler, inputs, args, sampling)}
    elif mode == "inpaint":
        results = run_inpaint(decoder, upsampler, inputs, args, sampling, masks)
    else:
        results = run_variations(decoder, upsampler, inputs, args, sampling)
    seconds = time.perf_counter() - start

    written = {}
    for name, samples in results.items():
        folder = storage.join(args.out_dir, name)
        if mode == "interpolate":
            written[name] = write_samples(folder, samples, [inputs[0][2]], [inputs[1][2]], "strip.png")
        elif mode == "text_diff":
            written[name] = write_samples(folder, samples, [inputs[0][2]], [], "strip.png")
        else:
            source = next(image for n, _, image in inputs if n == name)
            written[name] = write_samples(folder, samples, [source], [], "grid.png")
    settings = dict(
        mode=mode,
        **sampling,
        num_samples=None if mode in ("interpolate", "text_diff") else args.num_samples,
        frames=args.frames if mode in ("interpolate", "text_diff") else None,
        **text_diff_settings(args),
        inverted_noise=not args.fresh_noise and mode != "inpaint",
        inpaint_box=list(box) if box else None,
        inpaint_pixels_redrawn={n: int(m.sum()) for n, m in masks.items()} if box else None,
        decoder_size=decoder.image_size,
        output_size=int(next(iter(results.values())).shape[-2]),
        input_dir=storage.absolute(args.input_dir) if args.input_dir else None,
        inputs=[
            dict(name=n, path=storage.absolute(p), width=im.shape[1], height=im.shape[0])
            for n, p, im in inputs
        ],
        **workdir_steps(args, decoder, upsampler),
        raw_weights=args.raw_weights,
        seeds={name: args.seed for name in results},
        files={name: files for name, files in written.items()},
        seconds=round(seconds, 3),
    )
    with storage.open(storage.join(args.out_dir, "settings.json"), "w") as f:
        json.dump(settings, f, indent=1)
    count = sum(len(v) for v in written.values())
    print(f"{mode}: {count} images in {seconds:.1f} s; wrote {args.out_dir}", file=sys.stderr, flush=True)
    return settings


def cli():
    """The console script: main returns its settings to Python callers, the command exits 0 on success."""
    main()


if __name__ == "__main__":
    cli()
