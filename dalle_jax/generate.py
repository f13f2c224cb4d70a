"""Text-to-image sampling from a trained DALL-E workdir, with optional CLIP reranking and editing.

    python -m dalle_jax.generate --workdir W --prompt "a red circle in the top left" \\
        --num_samples 16 --top_k_rerank 4 --clip_workdir CW --cond_scale 3 --seed 0 --out_dir OUT

writes OUT/000.png ... (best first), OUT/grid.png, OUT/scores.json (prompt, per-image CLIP score and
rank) and OUT/tokens.npy (the image tokens of the written images, same order). `--prompts_file F`
(one prompt per line) samples every prompt in the same batches and writes OUT/NNN/ per line
(NNN = line index from 000), each laid out as above, plus OUT/prompts.json. Without
--clip_workdir nothing is reranked: all samples are written in sample order.

Editing (all with --image PNG, token-grid units; the prompt conditions the new tokens):
  --rows_kept N                     keep the first N token rows, regenerate the rest
  --inpaint_box top,left,h,w        regenerate only the tokens inside the rectangle
  --variations [--rows_kept N]      variations of the image (keeps a quarter of the rows by
                                    default; the prompt is optional: none = unconditional)
Large models: --config.mesh.fsdp=N (or --mesh train) shards the params as in training, and
--coordinator_address/--num_processes/--process_id run one job over several hosts (process 0
writes); see docs/generate.md.
--cond_scale != 1 needs a model trained with caption dropout (model.caption_dropout > 0 in its
config.json); --force_guidance guides anyway.
Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np

from core_jax import sharded_inference, storage
from core_jax.cli import ArgumentParser, fail
from core_jax.data.decode import SkipExample, decode_image
from core_jax.errors import ConfigError
from core_jax.metrics import image_grid
from dalle_jax import rerank, sampling
from dalle_jax.pipeline import default_variation_rows
from dalle_jax.sampling_cli import load_models, sampling_settings


def add_prompt_flags(p: ArgumentParser) -> None:
    """What both text-to-image commands take: prompts, samples, reranking and the output folder."""
    p.add_argument("--out_dir", required=True)
    p.add_argument("--prompt", default=None)
    p.add_argument("--prompts_file", default=None, help="one prompt per line; OUT/NNN/ per line")
    p.add_argument("--num_samples", type=int, default=16, help="samples per prompt")
    p.add_argument(
        "--top_k_rerank",
        type=int,
        default=None,
        help="keep the K samples CLIP likes best (needs --clip_workdir)",
    )
    p.add_argument("--clip_workdir", default=None, help="CLIP workdir that scores the samples for reranking")


def read_prompts(args, allow_none: bool = False) -> list:
    """--prompt or --prompts_file as a list of prompts; [None] (unconditional) when neither is
    given and `allow_none`. Checks --num_samples and --top_k_rerank too."""
    if args.prompt is not None and args.prompts_file is not None:
        raise ValueError("give --prompt or --prompts_file, not both")
    if args.prompts_file is not None:
        prompts = read_prompts_file(args.prompts_file)
    elif args.prompt is not None:
        if not args.prompt.strip():
            raise ValueError("--prompt is empty")
        prompts = [args.prompt]
    elif allow_none:
        prompts = [None]
    else:
        raise ValueError("give --prompt or --prompts_file")
    if args.num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {args.num_samples}")
    if args.top_k_rerank is not None:
        if not args.clip_workdir:
            raise ValueError("--top_k_rerank needs --clip_workdir (the CLIP that scores the samples)")
        if not 1 <= args.top_k_rerank <= args.num_samples:
            raise ValueError(
                f"--top_k_rerank must be in [1, --num_samples={args.num_samples}], got {args.top_k_rerank}"
            )
    return prompts


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m dalle_jax.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="trained DALL-E workdir")
    add_prompt_flags(p)
    p.add_argument(
        "--cond_scale",
        type=float,
        default=1.0,
        help="classifier-free guidance scale; 1 = none (conditional sampling)",
    )
    p.add_argument(
        "--force_guidance",
        action="store_true",
        help="allow --cond_scale != 1 on a model trained without caption dropout",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    p.add_argument("--batch_size", type=int, default=64, help="samples per forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image", default=None, help="PNG to complete / inpaint / vary")
    p.add_argument("--rows_kept", type=int, default=None)
    p.add_argument("--inpaint_box", default=None, help="top,left,height,width in token-grid units")
    p.add_argument("--variations", action="store_true")
    p.add_argument("--dvae_workdir", default=None, help="overrides the DALL-E config's dvae_workdir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument(
        "--raw_weights",
        action="store_true",
        help="DALL-E, dVAE and CLIP: load the raw trained "
        "weights, not their EMA (used by default when a run kept one)",
    )
    sharded_inference.add_flags(p)
    return p


def read_prompts_file(path: str) -> list[str]:
    try:
        with storage.open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f.read().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --prompts_file {path}: {e}") from None
    if not any(lines):
        raise ValueError(f"--prompts_file {path} holds no prompts")
    empty = [i for i, line in enumerate(lines) if not line]
    # Blank lines would shift the NNN numbering silently; trailing ones are harmless.
    while lines and not lines[-1]:
        lines.pop()
    if any(i < len(lines) for i in empty):
        raise ValueError(f"--prompts_file {path}: line {empty[0] + 1} is empty")
    return lines


def read_image(path: str) -> np.ndarray:
    try:
        with storage.open(path, "rb") as f:
            return decode_image(f.read(), min_side=1)
    except (OSError, SkipExample) as e:
        raise ValueError(f"cannot read --image {path}: {e}") from None


def parse_box(text: str) -> tuple[int, int, int, int]:
    try:
        box = tuple(int(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise ValueError(f"--inpaint_box must be four integers top,left,height,width, got {text!r}")
    return box


def check_args(args) -> tuple[list, str]:
    """(prompts, mode) from arguments alone, before any model is loaded."""
    prompts = read_prompts(args, allow_none=args.variations)  # [None]: unconditional variations
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.clip_workdir and prompts == [None]:
        raise ValueError("CLIP reranking needs a prompt; add --prompt or drop --clip_workdir")
    modes = [
        m
        for m, on in (
            ("inpaint", args.inpaint_box is not None),
            ("variations", args.variations),
            ("complete", args.rows_kept is not None and not args.variations),
        )
        if on
    ]
    if len(modes) > 1:
        raise ValueError(f"choose one editing mode, got {' and '.join(modes)}")
    mode = modes[0] if modes else "generate"
    if mode != "generate" and args.image is None:
        flag = {"complete": "rows_kept", "inpaint": "inpaint_box"}.get(mode, mode)
        raise ValueError(f"--{flag} needs --image")
    if mode == "generate" and args.image is not None:
        raise ValueError("--image needs an editing mode: --rows_kept, --inpaint_box or --variations")
    if args.inpaint_box is not None:
        parse_box(args.inpaint_box)
    check_sampling_flags(args)
    return prompts, mode


def check_sampling_flags(args) -> None:
    """--temperature, --top_k, --top_p and --cond_scale on their own, before any model is loaded
    (top_k's upper bound, the codebook size, is checked once the model is)."""
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature:g}")
    if args.top_k < 0:
        raise ValueError(f"--top_k must be >= 0 (0 = off), got {args.top_k}")
    if not 0 < args.top_p <= 1:  # also refuses nan
        raise ValueError(f"--top_p must be in (0, 1] (1 = off), got {args.top_p:g}")
    if not math.isfinite(args.cond_scale) or args.cond_scale < 0:
        raise ValueError(f"--cond_scale must be >= 0 (1 = no guidance), got {args.cond_scale:g}")


def warn_long_prompts(tokenizer, prompts, reader: str, log, lines: bool = False) -> dict[int, dict]:
    """One `warning:` line naming the prompts longer than `tokenizer` keeps (its `encode` cuts
    them), `reader` saying whose tokenizer it is; `lines`: prompts are numbered as file lines.
    Returns {prompt index: {"tokens": its length, "kept": what is kept}} of the prompts cut."""
    given = [(i, p) for i, p in enumerate(prompts) if p]
    long = [(given[j][0], n) for j, n in tokenizer.overlong([p for _, p in given])]
    keep = tokenizer.max_text_tokens
    cuts = {i: {"tokens": n, "kept": keep} for i, n in long}
    if not long:
        return cuts
    if not lines:
        log(
            f"warning: the prompt is {long[0][1]} tokens, more than the {keep} {reader} reads: the rest is cut"
        )
        return cuts
    shown = ", ".join(f"{i + 1} ({n} tokens)" for i, n in long[:5]) + (", ..." if len(long) > 5 else "")
    log(
        f"warning: {len(long)} prompts are longer than the {keep} tokens {reader} reads and are cut: lines {shown}"
    )
    return cuts


def write_prompt_dir(
    out_dir: str,
    prompt,
    images: np.ndarray,
    arrays: dict,
    clip_scores: np.ndarray | None,
    keep: int,
    meta: dict,
) -> dict:
    """Writes NNN.png best first, grid.png, each of `arrays` ({file name: [S, ...] per sample, in
    sample order}) in the images' order, and scores.json; returns the scores dict."""

    storage.makedirs(out_dir)
    order = rerank.rank(clip_scores)[:keep] if clip_scores is not None else np.arange(keep)
    entries = []
    for r, i in enumerate(order):
        name = f"{r:03d}.png"
        storage.write_png(storage.join(out_dir, name), images[i])
        entry = {"file": name, "rank": r, "sample": int(i)}
        if clip_scores is not None:
            entry["clip_score"] = float(clip_scores[i])
        entries.append(entry)
    storage.write_png(storage.join(out_dir, "grid.png"), image_grid(images[order]))
    for name, array in arrays.items():
        with storage.open(storage.join(out_dir, name), "wb") as f:
            np.save(f, np.asarray(array)[order])
    scores = dict(meta, prompt=prompt, reranked=clip_scores is not None, images=entries)
    if clip_scores is not None:
        scores["all_clip_scores"] = [float(s) for s in clip_scores]  # in sample order
    with storage.open(storage.join(out_dir, "scores.json"), "w") as f:
        json.dump(scores, f, indent=1)
    return scores


def main(argv=None, *, pipeline=None, clip=None):
    """The command; `pipeline` / `clip` (already loaded from --workdir / --clip_workdir) skip
    loading, for notebooks and tests that call it many times."""
    args = build_parser().parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        storage.check_reachable(
            args.out_dir, args.workdir, args.clip_workdir, args.dvae_workdir, args.image, args.prompts_file
        )
        sharded_inference.start(args)  # several hosts sample as one job; before any device is used
        prompts, mode = check_args(args)
        box = parse_box(args.inpaint_box) if args.inpaint_box is not None else None
        source = read_image(args.image) if args.image is not None else None
        for name in ("workdir", "clip_workdir", "dvae_workdir"):
            path = getattr(args, name)
            if path and not storage.isdir(path):
                raise FileNotFoundError(f"--{name} not found: {path}")
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))

    try:
        pipe, clip = load_models(args, pipeline, clip, step=args.step)
        cuts = warn_long_prompts(
            pipe.tokenizer, prompts, "the DALL-E", log, lines=args.prompts_file is not None
        )
        known = None
        if mode == "inpaint":
            known = sampling.rectangle_mask(pipe.grid, *box)
        elif mode in ("complete", "variations"):
            rows = args.rows_kept if args.rows_kept is not None else default_variation_rows(pipe.grid)
            known = sampling.completion_mask(pipe.grid, rows)
        sample_kwargs = dict(
            seed=args.seed,
            batch_size=args.batch_size,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            cond_scale=None if args.cond_scale == 1.0 else args.cond_scale,
            force_guidance=args.force_guidance,
        )
        image_tokens = pipe.encode_images(source[None])[0] if source is not None else None
        start = time.perf_counter()
        tokens = pipe.generate(
            prompts, args.num_samples, image_tokens=image_tokens, known_mask=known, **sample_kwargs
        )
    except (ValueError, FileNotFoundError, KeyError, ConfigError) as e:
        fail(str(e))
    images = pipe.decode(tokens.reshape(-1, pipe.num_image_tokens), args.batch_size)
    images = images.reshape(tokens.shape[:2] + images.shape[1:])
    seconds = time.perf_counter() - start
    clip_scores = None
    if clip is not None:
        clip_scores = rerank.group_scores(clip, images, prompts, batch_size=args.batch_size)
    if not sharded_inference.is_writer():  # every process holds all samples; one writes them
        return None

    keep = args.top_k_rerank or args.num_samples
    meta = dict(
        mode=mode,
        **sampling_settings(args, pipe),
        top_k_rerank=args.top_k_rerank,
        image=args.image,
        rows_kept=args.rows_kept,
        inpaint_box=list(box) if box else None,
    )
    results = []
    for p, prompt in enumerate(prompts):
        out_dir = args.out_dir if args.prompts_file is None else storage.join(args.out_dir, f"{p:03d}")
        results.append(
            write_prompt_dir(
                out_dir,
                prompt,
                images[p],
                {"tokens.npy": tokens[p].astype(np.int32)},
                None if clip_scores is None else clip_scores[p],
                keep,
                dict(meta, truncated={"dalle": cuts[p]} if p in cuts else None),
            )
        )
    if args.prompts_file is not None:
        with storage.open(storage.join(args.out_dir, "prompts.json"), "w") as f:
            json.dump({f"{p:03d}": prompt for p, prompt in enumerate(prompts)}, f, indent=1)
    log(
        f"{len(prompts) * args.num_samples} samples ({len(prompts)} prompts, {mode}) sampled and "
        f"decoded in {seconds:.1f} s; wrote {len(prompts) * keep} images to {args.out_dir}"
    )
    return results


def cli():
    """The console script: main returns its results to Python callers, the command exits 0 on success."""
    main()


if __name__ == "__main__":
    cli()
