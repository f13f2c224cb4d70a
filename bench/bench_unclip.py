"""The unCLIP decoder on the shapes suite: what its images keep of their CLIP embedding.

    python -m bench.bench_unclip --clip_workdir CW --decoder_workdir DW [--upsampler_workdir UW] \\
        [--quick] [--parts ceiling,placement,position_probe,variations,guidance,samplers,text_diffs] \\
        [--out unclip.json] [--md unclip.md]

Reuses a trained CLIP and decoder (it trains nothing). Held-out scenes come from
`core_jax.data.shapes.make_example` (test_seen / test_unseen, --data_seed), half one-object and
half two-object like `dalle_jax.evaluate_fidelity.choose_captions`, and every image is scored by
`core_jax.data.shapes_checker.caption_fidelity` against its scene's caption. The checker reads
64x64 scenes and brings any other size to 64 with its own bilinear resize; decoder samples
(32x32 for configs/unclip_decoder_shapes.py) are scored that way, upsampled ones as they are.
Scored that way, the 32x32 area-downsampled ground truth of 96 + 96 held-out scenes passes 1.000.

Parts (full counts; --quick shrinks them for a smoke run):
  ceiling     decode the TRUE CLIP image embeddings of 96 scenes per split (the decoder's sampling
              defaults, one sample each): pass rate seen / unseen, one- / two-object, and the
              colour-swap rate of two-object scenes (both shapes found with each other's colour),
              and the share of one-object scenes drawn with the right colour and shape wherever
              the object is (so a decoder that cannot place shows apart from one that cannot
              draw). With --upsampler_workdir also after upsampling. Cost: 192 decodes.
  placement   where the decoder puts the object when the noise hides it: 48 one-object test_seen
              scenes noised to steps 0.8 T .. T - 1, the object's centre in the network's x0
              prediction against the source's (brightness-weighted, pixels of the decoder's size),
              with the scene's CLIP embedding and with the null condition. A decoder that reads
              the layout from the embedding is far closer with it at the noisiest steps, where
              sampling decides where objects go. Cost: 8 network passes per scene.
  position_probe
              how much of an object's place the CLIP image embedding itself holds: a ridge
              regression from the embeddings of 2000 one-object train scenes to the object's centre,
              its mean error on 300 test_seen scenes (64x64 pixels) against always answering the
              mean centre. When the two are close the CLIP lost the place, and no decoder can put
              the object where the caption says. Cost: 2300 CLIP image embeddings.
  variations  section 3.1's variations of 48 test_seen scenes, 4 each, at several DDIM etas from
              the inverted noise (dalle_jax.unclip.uses.variations): the source caption's pass
              rate and the mean PSNR to the source (at the decoder's size). Targets at the default
              eta: pass >= 0.8 (a variation keeps the scene) and PSNR < 25 dB (it is no copy).
              Cost: 48 inversions + 48 x 4 decodes per eta.
  guidance    48 embeddings (24 per split) x 4 samples from fresh noise at s = 1, 2, 3, 5: pass
              rate and diversity (the mean absolute pixel difference, in [0, 1], between two
              samples of one embedding, over every pair). Cost: 192 decodes per scale.
  samplers    64 embeddings (32 per split), one sample each from the same start noise, with
              DPM-Solver++ 10 / 20, DDIM 25 / 50 and DDPM 1000 (the reference): pass rate and
              seconds per image (compiled ahead, so no compile time). Target: DPM-Solver++ 20
              within 0.05 of DDPM 1000. DDPM 1000 is the expensive row (1000 network passes per
              image, twice with guidance). With an upsampler each row is also scored upsampled.
  text_diffs  section 3.3's text diffs of 48 one-object scenes (24 per split): the caption with ONE
              attribute swapped (colour in even scenes, shape in odd ones, never to a held-out
              pair), edited at strength 0.25 and 0.5 with the new caption (and at 0.5 without a
              caption, so only the embedding edits), 2 frames each (theta 0 and the strength):
              the share of final frames that pass the NEW caption, the share of theta-0 frames that
              pass the OLD one (the control: the inverted noise redraws the source), and the shares
              of edited embeddings z_theta (what the decoder is given) and of final frames' CLIP
              embeddings (what it drew) closer to the new caption's embedding than to the old one's.
              Target: >= 0.7 of edits pass at the default strength. Cost: 96 inversions + 288
              decodes (DDIM 50).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import time

import jax
import numpy as np

from bench import common
from bench.clip_position import brightness_centres, images_of, one_object_scenes, position_probe
from core_jax.cli import ArgumentParser, fail
from core_jax.data import shapes
from core_jax.data.shapes_checker import caption_fidelity, detect_objects
from dalle_jax.unclip import denoise, pixels, uses
from dalle_jax.unclip import schedule as schedule_lib
from dalle_jax.unclip.api import Decoder, Upsampler

PARTS = ("ceiling", "placement", "position_probe", "variations", "guidance", "samplers", "text_diffs")
SPLITS = ("test_seen", "test_unseen")
PRESETS = {
    "full": dict(
        ceiling=96,
        placement=48,
        probe_train=2000,
        probe_test=300,
        variations=48,
        variation_samples=4,
        guidance=48,
        guidance_samples=4,
        samplers=64,
        text_diffs=48,
    ),
    "quick": dict(
        ceiling=4,
        placement=2,
        probe_train=16,
        probe_test=4,
        variations=2,
        variation_samples=2,
        guidance=2,
        guidance_samples=2,
        samplers=2,
        text_diffs=2,
    ),
}
PRESETS["toy"] = PRESETS["quick"]
# The noisiest steps, as fractions of T - 1, where the placement part compares x0 predictions.
PLACEMENT_FRACTIONS = (1.0, 0.95, 0.9, 0.8)
VARIATION_ETAS = (0.0, 0.5, uses.VARIATION_ETA, 1.0)
GUIDANCE_SCALES = (1.0, 2.0, 3.0, 5.0)
SAMPLER_ROWS = (("dpmpp", 10), ("dpmpp", 20), ("ddim", 25), ("ddim", 50), ("ddpm", 1000))
REFERENCE_ROW = "ddpm 1000"
# (strength, whether the decoder reads the new caption): the paper's range of strengths (section
# 3.3: "typically in [0.25, 0.50]"), and the default strength without a caption, which shows how
# much of an edit the embedding makes on its own.
TEXT_DIFF_ROWS = ((0.25, True), (uses.TEXT_DIFF_STRENGTH, True), (uses.TEXT_DIFF_STRENGTH, False))
# Targets: a variation keeps its scene but is no copy; a 20-step solver matches the 1000-step chain.
VARIATION_PASS_GOAL = 0.8
VARIATION_PSNR_GOAL = 25.0
SAMPLER_GAP_GOAL = 0.05
TEXT_DIFF_PASS_GOAL = 0.7  # an edit at the default strength shows the new caption
MAX_PSNR = 100.0  # identical images count as 100 dB, so a mean stays finite


# ----------------------------------------------------------------------------- held-out scenes


def held_out_scenes(split: str, count: int, seed: int) -> list[dict]:
    """`count` scenes of `split`: round(count / 2) one-object then the rest two-object (the
    share choose_captions draws), scene i of each kind `make_example(split, i, seed)` with the
    kind forced. Fixed for a seed."""
    n_one = int(round(0.5 * count))
    two = [shapes.make_example(split, i, seed, one_object_fraction=0.0) for i in range(count - n_one)]
    return one_object_scenes(split, n_one, seed) + two


def swap_attribute(scene: dict, index: int, seed: int) -> tuple[str, str]:
    """(kind, new caption) of a one-object scene with ONE attribute swapped: its colour when
    `index` is even, else its shape, to a value drawn (fixed by seed and index) among those whose
    colour-shape pair is not held out, so the edit aims at a pair the models trained on."""
    (obj,) = scene["objects"]
    kind = "colour" if index % 2 == 0 else "shape"
    if kind == "colour":
        pairs = [(c, obj["shape"]) for c in shapes.COLOURS if c != obj["colour"]]
    else:
        pairs = [(obj["colour"], s) for s in shapes.SHAPES if s != obj["shape"]]
    pairs = [p for p in pairs if p not in shapes.HELD_OUT_PAIRS]
    pair = pairs[np.random.default_rng([int(seed), int(index)]).integers(len(pairs))]
    return kind, shapes.caption_for([pair], position=scene["position"])


def pass_rates(images, scenes) -> np.ndarray:
    """float [N]: caption_fidelity of image i against scene i's caption."""
    return np.array([caption_fidelity(im, s["caption"]) for im, s in zip(images, scenes)])


def colour_swapped(image, scene) -> bool:
    """Whether a two-object scene came out with both shapes right but their colours exchanged:
    exactly two objects found, matched to the true ones by position (the pairing with the smaller
    total centre distance), each with its true object's shape and the other object's colour."""
    found = detect_objects(image)
    true = scene["objects"]
    if len(found) != 2 or len(true) != 2 or true[0]["colour"] == true[1]["colour"]:
        return False

    def distance(order):
        return sum(np.hypot(*np.subtract(f["centre"], t["centre"])) for f, t in zip(order, true))

    matched = min(itertools.permutations(found), key=distance)
    shapes_right = all(f["shape"] == t["shape"] for f, t in zip(matched, true))
    exchanged = matched[0]["colour"] == true[1]["colour"] and matched[1]["colour"] == true[0]["colour"]
    return shapes_right and exchanged


def drawn_anywhere(image, scene) -> bool:
    """Whether a one-object scene's object is drawn with its colour and shape, wherever it is:
    with the pass rate it tells a decoder that cannot draw from one that cannot place."""
    found = detect_objects(image)
    (true,) = scene["objects"]
    return len(found) == 1 and (found[0]["colour"], found[0]["shape"]) == (true["colour"], true["shape"])


def psnr(a, b) -> np.ndarray:
    """float [N]: PSNR in dB of uint8 images a[i] against b[i], capped at MAX_PSNR."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    mse = (diff**2).reshape(len(diff), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return np.minimum(10 * np.log10(255.0**2 / mse), MAX_PSNR)


def diversity(samples) -> float:
    """Mean absolute pixel difference (in [0, 1]) between two samples of one embedding, over every
    pair of samples [N, K, H, W, 3] of each embedding, then over embeddings."""
    x = np.asarray(samples, np.float32) / 255.0
    pairs = [
        np.abs(x[:, i] - x[:, j]).mean(axis=(1, 2, 3))
        for i, j in itertools.combinations(range(x.shape[1]), 2)
    ]
    return float(np.mean(pairs)) if pairs else 0.0


def split_rates(scores: np.ndarray, scenes) -> dict:
    one = np.array([s["position"] is not None for s in scenes])
    out = {"all": float(scores.mean())}
    out["one_object"] = float(scores[one].mean()) if one.any() else None
    out["two_object"] = float(scores[~one].mean()) if (~one).any() else None
    return out


# ----------------------------------------------------------------------------- timed sampling


class TimedSampler:
    """The decoder's (and upsampler's) sampling compiled ahead of time per setting, so a timing
    holds the sampling alone; each setting compiles once."""

    def __init__(self, decoder, upsampler=None):
        self.decoder, self.upsampler = decoder, upsampler
        self._decode = jax.jit(
            functools.partial(denoise.sample_decoder, decoder.model, decoder.schedule),
            static_argnames=("sampler", "steps", "cond_scale", "eta", "prediction"),
        )
        if upsampler is not None:
            self._upsample = jax.jit(
                functools.partial(denoise.sample_upsampler, upsampler.model, upsampler.schedule),
                static_argnames=("sampler", "steps", "eta", "prediction"),
            )
        self._compiled = {}

    def _run(self, key, jitted, args, static) -> tuple[np.ndarray, float]:
        if key not in self._compiled:
            self._compiled[key] = jitted.lower(*args, **static).compile()
        start = time.perf_counter()
        out = jax.block_until_ready(self._compiled[key](*args))
        return np.asarray(out), time.perf_counter() - start

    def decode(self, z, *, sampler: str, steps: int, cond_scale: float, seed: int, eta: float = 0.0):
        """(uint8 [N, S, S, 3], seconds) drawn from embeddings z [N, E] without captions."""
        d = self.decoder
        base = jax.random.key(int(seed))
        args = (
            d.params,
            d.condition(z),
            d.noise(len(z), seed),
            jax.random.fold_in(base, 1),
        )
        static = dict(sampler=sampler, steps=steps, cond_scale=cond_scale, eta=eta, prediction=d.prediction)
        out, seconds = self._run(("decode", len(z), *static.items()), self._decode, args, static)
        return pixels.to_uint8(out), seconds

    def upsample(self, images, *, seed: int):
        """(uint8 [N, S * f, S * f, 3], seconds) with the upsampler's own sampling defaults."""
        u, s = self.upsampler, self.upsampler.config.sample
        n, h, w, _ = images.shape
        base = jax.random.key(int(seed))
        noise = denoise.start_noise(jax.random.fold_in(base, 0), (n, h * u.factor, w * u.factor, 3))
        args = (u.params, pixels.to_model(images), noise, jax.random.fold_in(base, 1))
        static = dict(sampler=str(s.sampler), steps=int(s.steps), eta=float(s.eta), prediction=u.prediction)
        out, seconds = self._run(("upsample", images.shape, *static.items()), self._upsample, args, static)
        return pixels.to_uint8(out), seconds


# ----------------------------------------------------------------------------- the parts


def decoder_defaults(decoder, cond_scale: float | None) -> dict:
    s = decoder.config.sample
    scale = float(s.cond_scale if cond_scale is None else cond_scale)
    return dict(sampler=str(s.sampler), steps=int(s.steps), cond_scale=scale)


def run_ceiling(timed, scenes_by_split, sampling, seed) -> dict:
    out = {"sampling": sampling, "splits": {}}
    for split, scenes in scenes_by_split.items():
        z = timed.decoder.embed_images(images_of(scenes))
        images, _ = timed.decode(z, seed=seed, **sampling)
        row = {"count": len(scenes), "pass_rate": split_rates(pass_rates(images, scenes), scenes)}
        two = [(im, s) for im, s in zip(images, scenes) if s["relation"] is not None]
        row["colour_swap_rate"] = float(np.mean([colour_swapped(im, s) for im, s in two])) if two else None
        one = [(im, s) for im, s in zip(images, scenes) if s["relation"] is None]
        row["one_object_drawn_rate"] = (
            float(np.mean([drawn_anywhere(im, s) for im, s in one])) if one else None
        )
        if timed.upsampler is not None:
            larger, _ = timed.upsample(images, seed=seed)
            row["upsampled_pass_rate"] = split_rates(pass_rates(larger, scenes), scenes)
        out["splits"][split] = row
    return out


def run_placement(decoder, scenes, seed) -> dict:
    images = images_of(scenes)
    x0 = decoder.targets(images)
    cond = decoder.condition(decoder.embed_images(images))
    # Guidance's null condition (one row) for every scene.
    null = {key: np.repeat(row, len(x0), axis=0) for key, row in denoise.null_condition(cond).items()}
    noise = np.asarray(denoise.start_noise(jax.random.key(int(seed)), x0.shape))
    source = brightness_centres(x0)
    pairs = np.linalg.norm(source[:, None] - source[None], axis=-1)
    apply = jax.jit(lambda params, x, t, c: decoder.model.apply({"params": params}, x, t, **c))
    last = decoder.schedule.num_train_steps - 1
    rows = []
    for fraction in PLACEMENT_FRACTIONS:
        t = np.full((len(x0),), int(round(fraction * last)), np.int32)
        alpha, sigma = schedule_lib.alpha_sigma(decoder.schedule, t, x0.ndim)
        x_t = schedule_lib.q_sample(decoder.schedule, x0, t, noise)
        row = {"t": int(t[0]), "snr": float((alpha.ravel()[0] / sigma.ravel()[0]) ** 2)}
        for name, c in (("with_embedding", cond), ("null", null)):
            out = apply(decoder.params, x_t, t.astype(np.float32), c)
            pred, _ = schedule_lib.predict_x0_eps(decoder.prediction, out, x_t, alpha, sigma)
            row[f"{name}_px"] = float(np.linalg.norm(brightness_centres(pred) - source, axis=-1).mean())
        rows.append(row)
    return {
        "count": len(scenes),
        "image_size": decoder.image_size,
        "random_pairing_px": float(pairs[~np.eye(len(x0), dtype=bool)].mean()) if len(x0) > 1 else None,
        "rows": rows,
    }


def run_variations(decoder, scenes, num_samples, seed) -> dict:
    images = images_of(scenes)
    z = decoder.embed_images(images)
    sources = uses.decoder_view(decoder, images)
    inverted = decoder.invert(images, z, steps=uses.VARIATION_STEPS)
    rows = []
    for eta in VARIATION_ETAS:
        samples = uses.variations(
            decoder, images, num_samples, eta=float(eta), seed=seed, embeddings=z, inverted=inverted
        ).reshape((-1,) + sources.shape[1:])
        repeated = [s for s in scenes for _ in range(num_samples)]
        rows.append(
            {
                "eta": float(eta),
                "pass_rate": float(pass_rates(samples, repeated).mean()),
                "psnr_db": float(psnr(samples, np.repeat(sources, num_samples, axis=0)).mean()),
                "default": float(eta) == uses.VARIATION_ETA,
            }
        )
    return {
        "count": len(scenes),
        "samples_per_image": num_samples,
        "sampler": f"{uses.VARIATION_SAMPLER} {uses.VARIATION_STEPS}, inverted noise, cond_scale 1",
        "source_pass_rate": float(pass_rates(sources, scenes).mean()),
        "rows": rows,
    }


def run_guidance(timed, scenes, num_samples, sampling, seed) -> dict:
    z = np.repeat(timed.decoder.embed_images(images_of(scenes)), num_samples, axis=0)
    repeated = [s for s in scenes for _ in range(num_samples)]
    rows = []
    for scale in GUIDANCE_SCALES:
        images, _ = timed.decode(z, seed=seed, **dict(sampling, cond_scale=float(scale)))
        rows.append(
            {
                "cond_scale": float(scale),
                "pass_rate": float(pass_rates(images, repeated).mean()),
                "diversity": diversity(images.reshape((len(scenes), num_samples) + images.shape[1:])),
            }
        )
    return {"count": len(scenes), "samples_per_embedding": num_samples, "sampling": sampling, "rows": rows}


def run_samplers(timed, scenes, cond_scale, seed) -> dict:
    z = timed.decoder.embed_images(images_of(scenes))
    rows = []
    for sampler, steps in SAMPLER_ROWS:
        images, seconds = timed.decode(z, sampler=sampler, steps=steps, cond_scale=cond_scale, seed=seed)
        row = {
            "setting": f"{sampler} {steps}",
            "pass_rate": float(pass_rates(images, scenes).mean()),
            "seconds_per_image": seconds / len(scenes),
        }
        if timed.upsampler is not None:
            larger, up_seconds = timed.upsample(images, seed=seed)
            row["upsampled_pass_rate"] = float(pass_rates(larger, scenes).mean())
            row["upsampled_seconds_per_image"] = (seconds + up_seconds) / len(scenes)
        rows.append(row)
    return {"count": len(scenes), "cond_scale": cond_scale, "rows": rows}


def mean_where(values: np.ndarray, where: np.ndarray) -> float | None:
    return float(values[where].mean()) if where.any() else None


def run_text_diffs(decoder, scenes, seed, data_seed) -> dict:
    """Every scene edited per TEXT_DIFF_ROWS with 2 frames (theta 0 and the strength)."""
    swaps = [swap_attribute(s, i, data_seed) for i, s in enumerate(scenes)]
    kinds = np.array([kind for kind, _ in swaps])
    images = images_of(scenes)
    z = decoder.embed_images(images)
    news = [new for _, new in swaps]
    directions = np.stack(
        [uses.caption_direction(decoder, s["caption"], new) for s, new in zip(scenes, news)]
    )
    rows, inverted = [], {}
    for strength, with_caption in TEXT_DIFF_ROWS:
        if with_caption not in inverted:  # one inversion per scene and caption, shared by the strengths
            inverted[with_caption] = uses.text_diff_noise(
                decoder, images, news, z, decoder_caption=with_caption
            )
        first, last = [], []
        for i, (scene, new) in enumerate(zip(scenes, news)):
            frames = uses.text_diff(
                decoder,
                images[i],
                scene["caption"],
                new,
                strength=strength,
                frames=2,
                decoder_caption=with_caption,
                seed=seed,
                embedding=z[i : i + 1],
                inverted=inverted[with_caption][i : i + 1],
            )
            first.append(frames[0])
            last.append(frames[1])
        passed = np.array([caption_fidelity(im, c) for im, c in zip(last, news)])
        control = np.array([caption_fidelity(im, s["caption"]) for im, s in zip(first, scenes)])
        # z . t_new > z . t_old exactly when z . (t_new - t_old) > 0, the text diff's direction:
        # for the edited embedding the decoder was given, and for its drawing's CLIP embedding.
        edited = np.stack([uses.text_diff_embeddings(z_i, d, [strength])[0] for z_i, d in zip(z, directions)])
        closer = np.sum(decoder.embed_images(np.stack(last)) * directions, axis=1) > 0
        rows.append(
            {
                "strength": float(strength),
                "decoder_caption": "new" if with_caption else "none",
                "pass_rate": float(passed.mean()),
                "pass_rate_colour": mean_where(passed, kinds == "colour"),
                "pass_rate_shape": mean_where(passed, kinds == "shape"),
                "theta0_pass_old": float(control.mean()),
                "embedding_closer_to_new": float(np.mean(np.sum(edited * directions, axis=1) > 0)),
                "clip_closer_to_new": float(np.mean(closer)),
                "default": float(strength) == uses.TEXT_DIFF_STRENGTH and with_caption,
            }
        )
    return {
        "count": len(scenes),
        "swaps": {"colour": int((kinds == "colour").sum()), "shape": int((kinds == "shape").sum())},
        "sampler": f"{uses.VARIATION_SAMPLER} {uses.VARIATION_STEPS}, inverted noise, eta 0, cond_scale 1",
        "examples": [{"old": s["caption"], "new": new} for s, (_, new) in list(zip(scenes, swaps))[:4]],
        "rows": rows,
    }


# ----------------------------------------------------------------------------- run, targets, report


def run(
    size: str,
    clip_workdir: str,
    decoder_workdir: str,
    upsampler_workdir: str | None = None,
    *,
    parts=PARTS,
    seed: int = 0,
    data_seed: int = 1,
    cond_scale: float | None = None,
) -> dict:
    """Every part of `parts` at the `size` preset ('full' | 'quick'); the result dict of the
    bench suite (name, size, seconds, targets) with one entry per part, each with its own seconds."""
    counts = PRESETS[size]
    t0 = time.perf_counter()
    decoder = Decoder.load(decoder_workdir, clip_workdir=clip_workdir)
    upsampler = Upsampler.load(upsampler_workdir) if upsampler_workdir else None
    uses.check_upsampler(decoder, upsampler)
    timed = TimedSampler(decoder, upsampler)
    sampling = decoder_defaults(decoder, cond_scale)

    def both_splits(n_per_split):
        return [s for split in SPLITS for s in held_out_scenes(split, n_per_split, data_seed)]

    result = {
        "name": "unclip",
        "size": size,
        "clip_workdir": os.path.abspath(clip_workdir),
        "decoder_workdir": os.path.abspath(decoder_workdir),
        "upsampler_workdir": os.path.abspath(upsampler_workdir) if upsampler_workdir else None,
        "decoder_size": decoder.image_size,
        "seed": seed,
        "data_seed": data_seed,
    }
    for part in parts:
        start = time.perf_counter()
        common.log(f"unclip: {part}")
        if part == "ceiling":
            by_split = {split: held_out_scenes(split, counts["ceiling"], data_seed) for split in SPLITS}
            out = run_ceiling(timed, by_split, sampling, seed)
        elif part == "placement":
            out = run_placement(decoder, one_object_scenes("test_seen", counts["placement"], data_seed), seed)
        elif part == "position_probe":
            out = position_probe(decoder.embed_images, counts["probe_train"], counts["probe_test"], data_seed)
        elif part == "variations":
            seen = held_out_scenes("test_seen", counts["variations"], data_seed)
            out = run_variations(decoder, seen, counts["variation_samples"], seed)
        elif part == "guidance":
            out = run_guidance(
                timed, both_splits(counts["guidance"] // 2), counts["guidance_samples"], sampling, seed
            )
        elif part == "samplers":
            out = run_samplers(timed, both_splits(counts["samplers"] // 2), sampling["cond_scale"], seed)
        elif part == "text_diffs":
            per_split = counts["text_diffs"] // 2
            scenes = [s for split in SPLITS for s in one_object_scenes(split, per_split, data_seed)]
            out = run_text_diffs(decoder, scenes, seed, data_seed)
        else:
            raise ValueError(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
        out["seconds"] = time.perf_counter() - start
        result[part] = out
    result["seconds"] = time.perf_counter() - t0
    result["targets"] = targets(result)
    return result


def targets(result: dict) -> list[dict]:
    rows = []
    if "variations" in result:
        default = next(r for r in result["variations"]["rows"] if r["default"])
        ok = default["pass_rate"] >= VARIATION_PASS_GOAL
        rows.append(
            common.target(
                f"unCLIP variations keep the scene (test_seen, eta {default['eta']})",
                round(default["pass_rate"], 3),
                f">= {VARIATION_PASS_GOAL}",
                ok,
                why="" if ok else "the decoder's samples lose what the source's CLIP embedding holds",
            )
        )
        ok = default["psnr_db"] < VARIATION_PSNR_GOAL
        rows.append(
            common.target(
                "unCLIP variations are no copies (PSNR to the source)",
                round(default["psnr_db"], 2),
                f"< {VARIATION_PSNR_GOAL}",
                ok,
                unit="dB",
                why="" if ok else "eta too small: the samples redraw the inverted source",
            )
        )
    if "samplers" in result:
        by = {r["setting"]: r["pass_rate"] for r in result["samplers"]["rows"]}
        if "dpmpp 20" in by and REFERENCE_ROW in by:
            gap = by[REFERENCE_ROW] - by["dpmpp 20"]
            ok = gap <= SAMPLER_GAP_GOAL
            rows.append(
                common.target(
                    "unCLIP DPM-Solver++ 20 steps vs DDPM 1000 (pass rate short of it)",
                    round(gap, 3),
                    f"<= {SAMPLER_GAP_GOAL}",
                    ok,
                    why="" if ok else "20 solver steps do not reach the 1000-step chain's samples",
                )
            )
    if "text_diffs" in result:
        default = next(r for r in result["text_diffs"]["rows"] if r["default"])
        ok = default["pass_rate"] >= TEXT_DIFF_PASS_GOAL
        rows.append(
            common.target(
                f"unCLIP text diffs show the new caption (one attribute swapped, strength {default['strength']})",
                round(default["pass_rate"], 3),
                f">= {TEXT_DIFF_PASS_GOAL}",
                ok,
                why="" if ok else "the decoder does not draw the edited embedding's scene",
            )
        )
    return rows


def markdown(result: dict) -> str:
    if result.get("skipped"):
        return f"### unCLIP on the shapes suite\n\nnot run: {result['skipped']}"
    lines = [
        f"### unCLIP on the shapes suite ({result['size']})",
        "",
        f"Decoder `{result['decoder_workdir']}` ({result['decoder_size']}x{result['decoder_size']}), CLIP "
        f"`{result['clip_workdir']}`"
        + (f", upsampler `{result['upsampler_workdir']}`" if result["upsampler_workdir"] else "")
        + f"; seed {result['seed']}, scenes of data seed {result['data_seed']} (bench/bench_unclip.py).",
        "",
    ]
    fmt = common.fmt
    if "ceiling" in result:
        c = result["ceiling"]
        s = c["sampling"]
        lines += [
            f"**Ceiling**: true CLIP embeddings decoded ({s['sampler']} {s['steps']}, s = {s['cond_scale']}), "
            f"{fmt(c['seconds'])} s.",
            "",
        ]
        header = [
            "split",
            "scenes",
            "pass",
            "one-object",
            "two-object",
            "colour swaps",
            "one-object drawn anywhere",
        ]
        upsampled = any("upsampled_pass_rate" in r for r in c["splits"].values())
        header += ["pass upsampled"] if upsampled else []
        rows = []
        for split, r in c["splits"].items():
            p = r["pass_rate"]
            row = [
                split,
                r["count"],
                fmt(p["all"]),
                fmt(p["one_object"]),
                fmt(p["two_object"]),
                fmt(r["colour_swap_rate"]),
                fmt(r.get("one_object_drawn_rate")),
            ]
            rows.append(row + ([fmt(r["upsampled_pass_rate"]["all"])] if upsampled else []))
        lines += [common.md_table(header, rows), ""]
    if "variations" in result:
        v = result["variations"]
        lines += [
            f"**Variations** of {v['count']} test_seen scenes x {v['samples_per_image']} ({v['sampler']}; "
            f"the sources themselves pass {fmt(v['source_pass_rate'])}), {fmt(v['seconds'])} s.",
            "",
            common.md_table(
                ["eta", "pass (source caption)", "PSNR to source (dB)"],
                [
                    [
                        fmt(r["eta"]) + (" (default)" if r["default"] else ""),
                        fmt(r["pass_rate"]),
                        fmt(r["psnr_db"]),
                    ]
                    for r in v["rows"]
                ],
            ),
            "",
        ]
    if "placement" in result:
        pl = result["placement"]
        lines += [
            f"**Placement**: {pl['count']} one-object test_seen scenes, the object's centre in the x0 "
            f"prediction from the noised scene vs the source's ({pl['image_size']}x{pl['image_size']} "
            f"pixels; random pairing {fmt(pl['random_pairing_px'])} px), {fmt(pl['seconds'])} s.",
            "",
            common.md_table(
                ["t", "SNR", "with the embedding (px)", "null condition (px)"],
                [
                    [str(r["t"]), f"{r['snr']:.3g}", fmt(r["with_embedding_px"]), fmt(r["null_px"])]
                    for r in pl["rows"]
                ],
            ),
            "",
        ]
    if "position_probe" in result:
        pr = result["position_probe"]
        lines += [
            f"**Position probe**: the object's centre read from the CLIP image embedding by a ridge "
            f"regression fitted on {pr['train_scenes']} one-object train scenes, on "
            f"{pr['test_scenes']} test_seen scenes: {fmt(pr['probe_px'])} px from the true centre, "
            f"against {fmt(pr['mean_centre_px'])} px always answering the mean centre (64x64 "
            f"pixels), {fmt(pr['seconds'])} s.",
            "",
        ]
    if "guidance" in result:
        g = result["guidance"]
        lines += [
            f"**Guidance**: {g['count']} embeddings x {g['samples_per_embedding']} samples, "
            f"{g['sampling']['sampler']} {g['sampling']['steps']}, {fmt(g['seconds'])} s.",
            "",
            common.md_table(
                ["s", "pass", "diversity"],
                [[fmt(r["cond_scale"]), fmt(r["pass_rate"]), fmt(r["diversity"])] for r in g["rows"]],
            ),
            "",
        ]
    if "samplers" in result:
        sm = result["samplers"]
        upsampled = any("upsampled_pass_rate" in r for r in sm["rows"])
        header = ["sampler", "pass", "s / image"] + (
            ["pass upsampled", "s / image upsampled"] if upsampled else []
        )
        rows = []
        for r in sm["rows"]:
            row = [r["setting"], fmt(r["pass_rate"]), fmt(r["seconds_per_image"])]
            if upsampled:
                row += [fmt(r["upsampled_pass_rate"]), fmt(r["upsampled_seconds_per_image"])]
            rows.append(row)
        lines += [
            f"**Samplers** on {sm['count']} embeddings (s = {sm['cond_scale']}, same start noise; "
            f"compiled ahead), {fmt(sm['seconds'])} s.",
            "",
            common.md_table(header, rows),
            "",
        ]
    if "text_diffs" in result:
        td = result["text_diffs"]
        example = td["examples"][0] if td["examples"] else None
        lines += [
            f"**Text diffs** of {td['count']} one-object scenes ({td['swaps']['colour']} colour and "
            f"{td['swaps']['shape']} shape swaps"
            + (f", e.g. {example['old']!r} -> {example['new']!r}" if example else "")
            + f"; {td['sampler']}), {fmt(td['seconds'])} s.",
            "",
            common.md_table(
                [
                    "strength",
                    "decoder caption",
                    "final frame passes new",
                    "colour swaps",
                    "shape swaps",
                    "theta 0 passes old",
                    "z_theta closer to new",
                    "CLIP: final closer to new",
                ],
                [
                    [
                        fmt(r["strength"]) + (" (default)" if r["default"] else ""),
                        r["decoder_caption"],
                        fmt(r["pass_rate"]),
                        fmt(r["pass_rate_colour"]),
                        fmt(r["pass_rate_shape"]),
                        fmt(r["theta0_pass_old"]),
                        fmt(r["embedding_closer_to_new"]),
                        fmt(r["clip_closer_to_new"]),
                    ]
                    for r in td["rows"]
                ],
            ),
            "",
        ]
    return "\n".join(lines).rstrip()


def targets_table(result: dict) -> str:
    """The targets as met / MISSED rows, like bench.run_all's table."""
    rows = [
        [t["name"], t["value"], t["goal"], common.status_text(t["met"]), t["why"]] for t in result["targets"]
    ]
    return common.md_table(["target", "measured", "goal", "status", "why missed"], rows)


def skipped(size: str, why: str) -> dict:
    """The suite's entry when no trained decoder was given: nothing measured, targets n/a."""
    return {"name": "unclip", "size": size, "skipped": why, "seconds": 0.0, "targets": []}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m bench.bench_unclip", description=__doc__.split("\n\n")[0])
    p.add_argument("--clip_workdir", required=True, help="the CLIP the decoder was trained on")
    p.add_argument("--decoder_workdir", required=True)
    p.add_argument("--upsampler_workdir", default=None)
    p.add_argument("--quick", action="store_true", help="a few scenes per part (a smoke run)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {','.join(PARTS)}")
    p.add_argument("--cond_scale", type=float, default=None, help="default: the decoder's config.sample")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--data_seed", type=int, default=1, help="which held-out scenes")
    p.add_argument("--out", default=None, help="results JSON")
    p.add_argument("--md", default=None, help="markdown report")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        fail(f"--parts: unknown or empty {unknown or parts}; choose from {','.join(PARTS)}")
    for flag in ("clip_workdir", "decoder_workdir", "upsampler_workdir"):
        path = getattr(args, flag)
        if path and not os.path.isdir(path):
            fail(f"--{flag} not found: {path}")
    try:
        result = run(
            "quick" if args.quick else "full",
            args.clip_workdir,
            args.decoder_workdir,
            args.upsampler_workdir,
            parts=parts,
            seed=args.seed,
            data_seed=args.data_seed,
            cond_scale=args.cond_scale,
        )
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    result["machine"] = common.machine_info()
    text = markdown(result) + "\n\n" + targets_table(result)
    for path, content in ((args.out, json.dumps(result, indent=1, default=str)), (args.md, text + "\n")):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(content)
    print(text)
    return result


if __name__ == "__main__":
    main()
