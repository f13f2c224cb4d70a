"""Caption fidelity of a DALL-E or an unCLIP trained on the shapes suite, scored by the shapes checker.

    python -m dalle_jax.evaluate_fidelity --workdir W [--clip_workdir CW] --split test_seen \\
        --num_prompts 200 --num_samples 16 --cond_scale 3 --out fidelity.json
    python -m dalle_jax.evaluate_fidelity --model unclip --prior_workdir PW --decoder_workdir DW \\
        [--upsampler_workdir UW] [--clip_workdir CW] --split test_seen ... --out fidelity.json

For `num_prompts` captions of the split (half one-object, half two-object like the data generator;
a fixed choice for a given --seed) it samples `num_samples` images per caption twice, with guidance
at --cond_scale and without (s = 1), every caption in the same large batches, and scores each with
`caption_fidelity` (1 if the image shows exactly the caption's scene). DALL-E: the transformer
samples tokens and the dVAE decodes them. unCLIP: the prior samples CLIP image embeddings (at
--prior_scale in both rows), the decoder (guided at --cond_scale, then at 1) and the upsampler draw
the images. Both write the same report, so the two are compared number for number.

Reported per setting (and split by one-/two-object captions):
  first      fidelity of the first sample of each caption (no reranking)
  mean       mean over all samples (the same expectation as `first`, with less noise)
  clip_best  fidelity of the sample CLIP scores highest (with --clip_workdir)
  any        fraction of captions with at least one faithful sample (the best any reranker can do)
The project's targets are on the headline number (clip_best at s when CLIP is given, else first at s):
>= 0.9 on test_seen, >= 0.6 on test_unseen.

Captions say nothing of size, so `test_ood` draws the captions of `test_seen`: for generated images
it is `test_seen` again, and it differs where real scenes are scored (--dvae_ceiling).
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import sys
import time

import numpy as np

from clip_jax.api import CLIPModel
from core_jax import sharded_inference, storage
from core_jax.cli import ArgumentParser, fail
from core_jax.data import shapes
from core_jax.data.shapes_checker import caption_fidelity
from core_jax.errors import ConfigError
from core_jax.metrics import image_grid
from dalle_jax import rerank
from dalle_jax.generate import check_sampling_flags
from dalle_jax.rerank import best_index
from dalle_jax.sampling_cli import load_models, sampling_settings
from dalle_jax.unclip import generate as generate_unclip
from dalle_jax.unclip.text_to_image import TextToImage

TARGETS = {"test_seen": 0.9, "test_unseen": 0.6}
SPLITS = shapes.SPLITS


def choose_captions(
    split: str, num_prompts: int, seed: int = 0, one_object_fraction: float = 0.5
) -> list[str]:
    """`num_prompts` captions of `split`: round(fraction * N) one-object captions, the rest
    two-object, each drawn without replacement from `all_captions(split)` (cycling through a fresh
    permutation when a kind has fewer captions than asked), then shuffled. Fixed for a seed."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    if num_prompts < 1:
        raise ValueError(f"--num_prompts must be >= 1, got {num_prompts}")
    rng = np.random.default_rng(seed)
    captions = shapes.all_captions(split)
    one = [c for c in captions if shapes.parse_caption(c)["position"] is not None]
    two = [c for c in captions if shapes.parse_caption(c)["position"] is None]
    n_one = int(round(one_object_fraction * num_prompts))

    def draw(pool, n):
        order = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-n // len(pool)))])
        return [pool[i] for i in order[:n]]

    chosen = draw(one, n_one) + draw(two, num_prompts - n_one)
    return [chosen[i] for i in rng.permutation(len(chosen))]


def _score_chunk(pairs):
    return [caption_fidelity(image, caption) for image, caption in pairs]


def fidelity_scores(images: np.ndarray, captions: list[str], workers: int = 1) -> np.ndarray:
    """float [P, S]: caption_fidelity of images uint8 [P, S, H, W, 3] against caption p.

    With workers > 1 the checker (numpy, ~5-20 ms an image) runs in spawned processes."""
    p, s = images.shape[:2]
    pairs = [(images[i, j], captions[i]) for i in range(p) for j in range(s)]
    if workers <= 1 or len(pairs) < 64:
        flat = _score_chunk(pairs)
    else:
        size = -(-len(pairs) // (4 * workers))
        chunks = [pairs[i : i + size] for i in range(0, len(pairs), size)]
        # spawn, not fork: the parent holds jax's threads
        with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            flat = [f for part in pool.map(_score_chunk, chunks) for f in part]
    return np.asarray(flat, np.float64).reshape(p, s)


def summarize(fid: np.ndarray, clip_scores: np.ndarray | None) -> dict:
    """The four numbers of one setting from fidelity [P, S] (and CLIP scores [P, S])."""
    out = {"first": float(fid[:, 0].mean()), "mean": float(fid.mean()), "any": float(fid.max(axis=1).mean())}
    if clip_scores is not None:
        best = best_index(clip_scores)
        out["clip_best"] = float(fid[np.arange(len(fid)), best].mean())
    return out


def save_grids(
    images_dir: str, name: str, images: np.ndarray, scores: np.ndarray | None, max_prompts: int = 64
) -> None:
    """<name>_first.png (and <name>_clip_best.png): one image per caption, captions in report order."""
    storage.makedirs(images_dir)
    images = images[:max_prompts]
    storage.write_png(storage.join(images_dir, f"{name}_first.png"), image_grid(images[:, 0]))
    if scores is not None:
        best = best_index(scores[:max_prompts])
        best_grid = image_grid(images[np.arange(len(images)), best])
        storage.write_png(storage.join(images_dir, f"{name}_clip_best.png"), best_grid)


class DalleSampler:
    """DALL-E's images for `evaluate`: the transformer samples image tokens (`sample_seconds`), the
    dVAE decodes them (`decode_seconds`)."""

    def __init__(self, pipe, batch_size: int = 256, **sample_kwargs):
        self.pipe, self.batch_size, self.sample_kwargs = pipe, batch_size, sample_kwargs

    def __call__(self, captions, num_samples: int, cond_scale: float, seed: int) -> tuple[np.ndarray, dict]:
        t0 = time.perf_counter()
        tokens = self.pipe.generate(
            captions,
            num_samples,
            seed=seed,
            batch_size=self.batch_size,
            cond_scale=None if cond_scale == 1.0 else cond_scale,
            **self.sample_kwargs,
        )
        t1 = time.perf_counter()
        images = self.pipe.decode(tokens.reshape(-1, self.pipe.num_image_tokens), self.batch_size)
        images = images.reshape(tokens.shape[:2] + images.shape[1:])
        return images, {"sample_seconds": t1 - t0, "decode_seconds": time.perf_counter() - t1}


class UnclipSampler:
    """unCLIP's images for `evaluate`: the prior samples CLIP image embeddings (`sample_seconds`),
    the decoder and upsampler draw the pixels (`decode_seconds`). `cond_scale` is the decoder's
    guidance; `sampling` (TextToImage.sampling's other arguments) is the same in every row."""

    def __init__(self, models: TextToImage, batch_size: int = 256, **sampling):
        self.models, self.batch_size, self.sampling = models, batch_size, sampling

    def __call__(self, captions, num_samples: int, cond_scale: float, seed: int) -> tuple[np.ndarray, dict]:
        sampling = dict(self.sampling, decoder_scale=cond_scale)
        out = self.models.generate(captions, num_samples, seed=seed, batch_size=self.batch_size, **sampling)
        seconds = out.seconds
        decode = seconds["decoder_seconds"] + seconds["upsampler_seconds"]
        return out.images, {"sample_seconds": seconds["prior_seconds"], "decode_seconds": decode}


def evaluate(
    draw,
    captions: list[str],
    *,
    num_samples: int,
    cond_scale: float,
    clip=None,
    seed: int = 0,
    batch_size: int = 256,
    workers: int = 1,
    log=print,
    images_dir: str | None = None,
) -> dict:
    """Fidelity at guidance `cond_scale` and at s = 1; returns the report dict (see module doc).
    `draw(captions, num_samples, cond_scale, seed)` -> (uint8 images [P, S, H, W, 3], its
    `sample_seconds` and `decode_seconds`): a DalleSampler or an UnclipSampler."""

    settings = [("guided", float(cond_scale))] if cond_scale != 1.0 else []
    settings.append(("unguided", 1.0))
    kinds = np.array(
        ["one_object" if shapes.parse_caption(c)["position"] else "two_object" for c in captions]
    )
    report = {
        "fidelity": {},
        "by_kind": {"one_object": {}, "two_object": {}},
        "timing": {},
        "prompts": [{"caption": c, "kind": k} for c, k in zip(captions, kinds)],
    }
    for name, scale in settings:
        images, seconds = draw(captions, num_samples, scale, seed)
        t0 = time.perf_counter()
        fid = fidelity_scores(images, captions, workers)
        t1 = time.perf_counter()
        scores = rerank.group_scores(clip, images, captions, batch_size) if clip is not None else None
        t2 = time.perf_counter()
        if images_dir:
            save_grids(images_dir, name, images, scores)
        report["fidelity"][name] = dict(summarize(fid, scores), cond_scale=scale)
        for kind in ("one_object", "two_object"):
            rows = kinds == kind
            if rows.any():
                kind_scores = None if scores is None else scores[rows]
                report["by_kind"][kind][name] = summarize(fid[rows], kind_scores)
        for i, entry in enumerate(report["prompts"]):
            entry[name] = fid[i].tolist()
            if scores is not None:
                entry[f"{name}_clip"] = [round(float(v), 5) for v in scores[i]]
        n = images.shape[0] * images.shape[1]
        sample_s, decode_s = seconds["sample_seconds"], seconds["decode_seconds"]
        report["timing"][name] = {
            "sample_seconds": sample_s,
            "decode_seconds": decode_s,
            "check_seconds": t1 - t0,
            "clip_seconds": t2 - t1,
            "images": n,
            "images_per_second_sampling": n / max(sample_s, 1e-9),
            "seconds_per_image": (sample_s + decode_s) / n,
        }
        log(
            f"{name} (s={scale:g}): {n} images sampled in {sample_s:.1f} s, decoded in "
            f"{decode_s:.1f} s, checked in {t1 - t0:.1f} s"
            + (f", CLIP-scored in {t2 - t1:.1f} s" if clip is not None else "")
        )
    return report


def dvae_ceiling(
    pipe, split: str, num_images: int, seed: int = 0, batch_size: int = 256, workers: int = 1
) -> dict:
    """Fidelity of dVAE reconstructions (decode(encode(x))) of `num_images` real scenes of the
    split: how much of the target the image tokenizer alone allows."""
    examples = [shapes.make_example(split, i, seed) for i in range(num_images)]
    originals = np.stack([e["image"] for e in examples])
    tokens = np.concatenate(
        [pipe.encode_images(originals[i : i + batch_size]) for i in range(0, num_images, batch_size)]
    )
    recon = pipe.decode(tokens, batch_size)
    captions = [e["caption"] for e in examples]
    # scored separately: the dVAE may work at another size (the checker resizes to 64)
    original_fid = fidelity_scores(originals[:, None], captions, workers)
    recon_fid = fidelity_scores(recon[:, None], captions, workers)
    return {
        "originals": float(original_fid.mean()),
        "reconstructions": float(recon_fid.mean()),
        "images": num_images,
    }


def headline(report: dict, split: str) -> dict:
    first = next(iter(report["fidelity"]))  # 'guided' when s != 1
    key = "clip_best" if "clip_best" in report["fidelity"][first] else "first"
    value = report["fidelity"][first][key]
    target = TARGETS.get(split)
    return {
        "setting": first,
        "metric": key,
        "value": value,
        "target": target,
        "meets_target": None if target is None else bool(value >= target),
    }


def format_table(report: dict) -> str:
    cols = ("first", "mean", "clip_best", "any")
    lines = [
        f"caption fidelity, {report['split']}: {report['num_prompts']} prompts x "
        f"{report['num_samples']} samples",
        f"{'setting':<22}" + "".join(f"{c:>11}" for c in cols),
    ]
    groups = [("all", report["fidelity"])] + [(k, v) for k, v in report["by_kind"].items() if v]
    for group, settings in groups:
        for name, nums in settings.items():
            scale = report["fidelity"][name]["cond_scale"]
            label = f"{group} s={scale:g}"
            lines.append(
                f"{label:<22}" + "".join(f"{nums[c]:>11.3f}" if c in nums else f"{'-':>11}" for c in cols)
            )
    if "dvae_ceiling" in report:
        c = report["dvae_ceiling"]
        lines.append(
            f"dVAE ceiling ({c['images']} real scenes): originals {c['originals']:.3f}, "
            f"reconstructions {c['reconstructions']:.3f}"
        )
    h = report["headline"]
    verdict = (
        ""
        if h["target"] is None
        else (f" (target {h['target']:.2f}: {'met' if h['meets_target'] else 'NOT met'})")
    )
    lines.append(f"headline {h['setting']} {h['metric']}: {h['value']:.3f}{verdict}")
    return "\n".join(lines)


# Flags of one model only, with their defaults: set with the other --model, they are an error.
DALLE_FLAGS = {
    "workdir": None,
    "force_guidance": False,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "dvae_workdir": None,
    "dvae_ceiling": False,
}
UNCLIP_FLAGS = dict.fromkeys(
    ("prior_workdir", "decoder_workdir", "upsampler_workdir", "prior_scale", "prior_sampler", "prior_steps")
    + ("sampler", "steps")
)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m dalle_jax.evaluate_fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        choices=("dalle", "unclip"),
        default="dalle",
        help="dalle: --workdir; unclip: --prior_workdir and --decoder_workdir [--upsampler_workdir]",
    )
    p.add_argument("--workdir", default=None, help="dalle: DALL-E workdir trained on the shapes suite")
    generate_unclip.add_model_flags(p, required=False)
    p.add_argument("--clip_workdir", default=None, help="CLIP workdir: also report CLIP-best of S")
    p.add_argument("--split", default="test_seen", choices=SPLITS)
    p.add_argument("--num_prompts", type=int, default=200)
    p.add_argument("--num_samples", type=int, default=16)
    p.add_argument(
        "--cond_scale",
        type=float,
        default=3.0,
        help="guidance of the guided row (dalle: the transformer's; unclip: the decoder's)",
    )
    p.add_argument(
        "--force_guidance",
        action="store_true",
        help="dalle: allow --cond_scale != 1 on a model trained without caption dropout",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="dalle only")
    p.add_argument("--top_k", type=int, default=0, help="dalle only")
    p.add_argument("--top_p", type=float, default=1.0, help="dalle only")
    generate_unclip.add_sampling_flags(p)
    p.add_argument("--batch_size", type=int, default=256, help="samples per forward")
    p.add_argument("--seed", type=int, default=0, help="picks the captions and the samples")
    p.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes for the checker"
    )
    p.add_argument("--dvae_workdir", default=None, help="dalle: overrides the DALL-E config's dvae_workdir")
    p.add_argument(
        "--raw_weights",
        action="store_true",
        help="every model: load the raw trained weights, not their EMA (used by default when a run kept one)",
    )
    p.add_argument("--out", required=True, help="JSON report")
    p.add_argument(
        "--dvae_ceiling",
        action="store_true",
        help="dalle: also score dVAE reconstructions of --num_prompts real scenes of the split",
    )
    p.add_argument(
        "--images_dir",
        default=None,
        help="also write grids of the first (and CLIP-best) sample of up to 64 captions",
    )
    sharded_inference.add_flags(p)  # dalle: the DALL-E and the CLIP
    return p


def check_model_flags(args) -> None:
    """ValueError for a flag of the other model, or a missing workdir of this one."""
    other, kind = (UNCLIP_FLAGS, "unclip") if args.model == "dalle" else (DALLE_FLAGS, "dalle")
    for name, default in other.items():
        if getattr(args, name) != default:
            raise ValueError(f"--{name} is for --model {kind}, not --model {args.model}")
    needed = ("workdir",) if args.model == "dalle" else ("prior_workdir", "decoder_workdir")
    missing = [f"--{name}" for name in needed if not getattr(args, name)]
    if missing:
        raise ValueError(f"--model {args.model} needs {' and '.join(missing)}")


def load_sampler(args, pipeline, clip, models, log):
    """(the model's sampler for `evaluate`, the reranking CLIP or None, the report's settings)."""
    if args.model == "unclip":
        if sharded_inference.mesh_overrides(args) or args.mesh in ("train", "data"):
            raise ValueError("--mesh and --config.mesh.* shard the DALL-E; --model unclip runs on one device")
        generate_unclip.check_sampling_args(args, "cond_scale")
        models = generate_unclip.load_models(args, models, log)
        flags = generate_unclip.sampling_flags(args)  # the decoder's scale is each row's own
        settings = generate_unclip.settings(
            args, models, models.sampling(decoder_scale=args.cond_scale, **flags)
        )
        settings["cond_scale"] = settings.pop("decoder_scale")
        if args.clip_workdir and clip is None:
            clip = CLIPModel.load(args.clip_workdir, raw_weights=args.raw_weights)
        return UnclipSampler(models, args.batch_size, **flags), clip, settings
    check_sampling_flags(args)
    pipe, clip = load_models(args, pipeline, clip)
    # Checked here, so that a bad value is a one-line error and not a traceback mid-run.
    if args.top_k > pipe.cfg.image_vocab_size:
        raise ValueError(f"--top_k must be in [0, {pipe.cfg.image_vocab_size}] (0 = off), got {args.top_k}")
    sampler = DalleSampler(
        pipe,
        args.batch_size,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        force_guidance=args.force_guidance,
    )
    return sampler, clip, sampling_settings(args, pipe)


def main(argv=None, *, pipeline=None, clip=None, models=None):
    """The command; `pipeline` (DALL-E), `models` (unCLIP's TextToImage) and `clip` (already
    loaded from the workdirs) skip loading."""
    args = build_parser().parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    try:
        storage.check_reachable(args.out, args.images_dir, args.workdir, args.clip_workdir)
        sharded_inference.start(args)  # several hosts sample as one job; before any device is used
        check_model_flags(args)
        if args.num_samples < 1 or args.batch_size < 1:
            raise ValueError("--num_samples and --batch_size must be >= 1")
        captions = choose_captions(args.split, args.num_prompts, args.seed)
        for name in ("workdir", "clip_workdir"):
            path = getattr(args, name)
            if path and not storage.isdir(path):
                raise FileNotFoundError(f"--{name} not found: {path}")
        draw, clip, settings = load_sampler(args, pipeline, clip, models, log)
    except (ValueError, FileNotFoundError, KeyError, ConfigError) as e:
        fail(str(e))
    report = evaluate(
        draw,
        captions,
        num_samples=args.num_samples,
        cond_scale=args.cond_scale,
        clip=clip,
        seed=args.seed,
        batch_size=args.batch_size,
        workers=args.workers,
        log=log,
        images_dir=args.images_dir if sharded_inference.is_writer() else None,
    )
    if args.dvae_ceiling:
        report["dvae_ceiling"] = dvae_ceiling(
            draw.pipe, args.split, args.num_prompts, args.seed, args.batch_size, args.workers
        )
    report = dict(**settings, split=args.split, num_prompts=args.num_prompts, **report)
    report["headline"] = headline(report, args.split)
    if not sharded_inference.is_writer():  # every process holds the whole report; one writes it
        return report
    storage.makedirs(storage.dirname(storage.absolute(args.out)))
    with storage.open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(format_table(report), flush=True)
    return report


def cli():
    """The console script: main returns its report to Python callers, the command exits 0 on success."""
    main()


if __name__ == "__main__":
    cli()
