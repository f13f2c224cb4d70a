"""Text-to-image with unCLIP (Ramesh et al. 2022): prior -> decoder -> optional upsampler, with
optional CLIP reranking; writes what `python -m dalle_jax.generate` writes.

    python -m dalle_jax.unclip.generate --prior_workdir PW --decoder_workdir DW [--upsampler_workdir UW] \\
        --prompt "a red circle in the top left" --num_samples 16 [--top_k_rerank 4 --clip_workdir CW] \\
        [--prior_scale S --decoder_scale S --sampler dpmpp --steps N --seed K] --out_dir OUT

writes OUT/000.png ... (best first when reranked, else in sample order), OUT/grid.png,
OUT/scores.json (prompt, per-image CLIP score and rank, every setting) and OUT/embeddings.npy (the
prior's CLIP image embeddings the written images were decoded from, same order; DALL-E writes its
image tokens, tokens.npy, there). `--prompts_file F` (one prompt per line) samples every prompt in
the same batches and writes OUT/NNN/ per line, each laid out as above, plus OUT/prompts.json.

The prior draws each embedding as the better of two by dot product with the caption's CLIP text
embedding (section 2.2); the decoder reads the embedding and the caption. --sampler / --steps /
--decoder_scale set the decoder, --prior_sampler / --prior_steps / --prior_scale the prior; unset,
each takes its model's config.sample (the upsampler always does). Reranking needs --clip_workdir,
the CLIP that scores the samples. Bad input: one `error:` line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import sys
import time

from clip_jax.api import CLIPModel
from core_jax import storage
from core_jax.cli import ArgumentParser, fail
from core_jax.errors import ConfigError
from dalle_jax import rerank
from dalle_jax.generate import add_prompt_flags, read_prompts, warn_long_prompts, write_prompt_dir
from dalle_jax.unclip.samplers import SAMPLERS
from dalle_jax.unclip.text_to_image import TextToImage, read_configs


def add_model_flags(p: ArgumentParser, required: bool = True) -> None:
    p.add_argument("--prior_workdir", required=required, help="trained unCLIP prior workdir")
    p.add_argument("--decoder_workdir", required=required, help="trained unCLIP decoder workdir")
    p.add_argument(
        "--upsampler_workdir", default=None, help="unCLIP upsampler taking the decoder's images larger"
    )


def add_sampling_flags(p: ArgumentParser) -> None:
    """The prior's and the decoder's sampling flags (the decoder's guidance scale is each command's own)."""
    p.add_argument(
        "--prior_scale",
        type=float,
        default=None,
        help="the prior's classifier-free guidance; 1 = none (default: the prior's config.sample)",
    )
    p.add_argument(
        "--prior_sampler", choices=SAMPLERS, default=None, help="the prior's sampler (default: its config's)"
    )
    p.add_argument(
        "--prior_steps", type=int, default=None, help="the prior's sampling steps (default: its config's)"
    )
    p.add_argument(
        "--sampler", choices=SAMPLERS, default=None, help="the decoder's sampler (default: its config's)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="the decoder's sampling steps (default: its config's)"
    )


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m dalle_jax.unclip.generate", description=__doc__.split("\n\n")[0])
    add_model_flags(p)
    add_prompt_flags(p)
    p.add_argument(
        "--decoder_scale",
        type=float,
        default=None,
        help="the decoder's classifier-free guidance; 1 = none (default: the decoder's config.sample)",
    )
    add_sampling_flags(p)
    p.add_argument("--batch_size", type=int, default=64, help="samples per batch, at every stage")
    p.add_argument(
        "--seed", type=int, default=0, help=">= 0; the same seed and batch size give the same images"
    )
    p.add_argument(
        "--raw_weights",
        action="store_true",
        help="every model: load the raw trained weights, not their EMA (used by default when a run kept one)",
    )
    return p


def check_sampling_args(args, decoder_scale_flag: str) -> None:
    """The sampling flags on their own, before any config is read; `decoder_scale_flag` names the
    command's flag for the decoder's guidance."""
    decoder_scale = getattr(args, decoder_scale_flag)
    for flag, value in (("prior_scale", args.prior_scale), (decoder_scale_flag, decoder_scale)):
        if value is not None and value < 0:
            raise ValueError(f"--{flag} must be >= 0 (1 = unguided), got {value:g}")
    for flag, value in (("steps", args.steps), ("prior_steps", args.prior_steps)):
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be >= 1, got {value}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")


def check_args(args) -> list[str]:
    """The prompts, from the arguments alone, before any model is loaded."""
    storage.check_reachable(args.out_dir, args.clip_workdir, args.prompts_file)
    prompts = read_prompts(args)
    check_sampling_args(args, "decoder_scale")
    if args.clip_workdir and not storage.isdir(args.clip_workdir):
        raise ValueError(f"--clip_workdir not found: {args.clip_workdir}")
    return prompts


def load_models(args, models: TextToImage | None, log) -> TextToImage:
    """The prior, decoder and upsampler of the flags (`models` when given), their configs checked
    together before any params load; prints the stack's warnings."""
    read_configs(args.prior_workdir, args.decoder_workdir, args.upsampler_workdir)
    if models is None:
        models = TextToImage.load(
            args.prior_workdir, args.decoder_workdir, args.upsampler_workdir, raw_weights=args.raw_weights
        )
    for warning in models.warnings:
        log(f"warning: {warning}")
    return models


def sampling_flags(args) -> dict:
    """TextToImage.sampling's keyword arguments from the flags, all but the decoder's scale."""
    return dict(
        prior_scale=args.prior_scale,
        prior_sampler=args.prior_sampler,
        prior_steps=args.prior_steps,
        sampler=args.sampler,
        steps=args.steps,
    )


def settings(args, models: TextToImage, sampling: dict) -> dict:
    """What scores.json and the fidelity report record: the model kind, every workdir and the
    sampling settings actually used."""
    return dict(
        model="unclip",
        prior_workdir=args.prior_workdir,
        decoder_workdir=args.decoder_workdir,
        upsampler_workdir=args.upsampler_workdir,
        clip_workdir=args.clip_workdir,
        num_samples=args.num_samples,
        **sampling,
        image_size=models.image_size,
        seed=args.seed,
        batch_size=args.batch_size,
    )


def warn_long_captions(models: TextToImage, prompts: list[str], log, lines: bool) -> dict[int, dict]:
    """warn_long_prompts for the prior's CLIP, and for the decoder's when it tokenizes differently.
    Returns {prompt index: {stage: {"tokens", "kept"}}} for every stage that cuts a prompt."""
    seen, cuts = set(), {}
    for stage, tokenizer in models.tokenizers.items():
        key = (tokenizer.path, tokenizer.context_length, tokenizer.pad_mode)
        said = key in seen  # the same tokenizer cuts the same prompts: warned once
        seen.add(key)
        stage_log = (lambda m: None) if said else log
        for i, cut in warn_long_prompts(tokenizer, prompts, f"the {stage}'s CLIP", stage_log, lines).items():
            cuts.setdefault(i, {})[stage] = cut
    return cuts


def main(argv=None, *, models: TextToImage | None = None, clip=None):
    """The command; `models` / `clip` (already loaded from the workdirs / --clip_workdir) skip
    loading, for notebooks and tests that call it many times."""
    args = build_parser().parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        prompts = check_args(args)
        models = load_models(args, models, log)
        flags = dict(sampling_flags(args), decoder_scale=args.decoder_scale)
        sampling = models.sampling(**flags)
        if args.clip_workdir and clip is None:
            clip = CLIPModel.load(args.clip_workdir, raw_weights=args.raw_weights)
        cuts = warn_long_captions(models, prompts, log, lines=args.prompts_file is not None)
    except (ValueError, FileNotFoundError, ConfigError) as e:
        fail(str(e))

    start = time.perf_counter()
    out = models.generate(prompts, args.num_samples, seed=args.seed, batch_size=args.batch_size, **flags)
    seconds = time.perf_counter() - start
    clip_scores = None
    if args.clip_workdir:
        clip_scores = rerank.group_scores(clip, out.images, prompts, batch_size=args.batch_size)

    keep = args.top_k_rerank or args.num_samples
    meta = dict(settings(args, models, sampling), mode="generate", top_k_rerank=args.top_k_rerank)
    results = []
    for p, prompt in enumerate(prompts):
        out_dir = args.out_dir if args.prompts_file is None else storage.join(args.out_dir, f"{p:03d}")
        scores = None if clip_scores is None else clip_scores[p]
        arrays = {"embeddings.npy": out.embeddings[p]}
        prompt_meta = dict(meta, truncated=cuts.get(p))
        results.append(write_prompt_dir(out_dir, prompt, out.images[p], arrays, scores, keep, prompt_meta))
    if args.prompts_file is not None:
        with storage.open(storage.join(args.out_dir, "prompts.json"), "w") as f:
            json.dump({f"{p:03d}": prompt for p, prompt in enumerate(prompts)}, f, indent=1)
    stages = ", ".join(f"{k.split('_')[0]} {v:.1f} s" for k, v in out.seconds.items() if v)
    log(
        f"{len(prompts) * args.num_samples} samples ({len(prompts)} prompts) in {seconds:.1f} s ({stages}); "
        f"wrote {len(prompts) * keep} images to {args.out_dir}"
    )
    return results


def cli():
    """The console script: main returns its results to Python callers, the command exits 0 on success."""
    main()


if __name__ == "__main__":
    cli()
