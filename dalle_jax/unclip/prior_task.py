"""The unCLIP diffusion prior (Ramesh et al. 2022, section 2.2) as a `core_jax.trainer.Task`: a
causal transformer (dalle_jax/unclip/prior.py) that draws a CLIP image embedding from a caption.

- Host, per example (example_fn): the caption's CLIP tokens and either the image at the CLIP's
  input size (any image source) or its pre-computed embedding (`data.embeddings_dir`, written by
  dalle_jax.unclip.encode_embeddings); in training the guidance-dropout flag `caption_kept`
  from the example's own rng (section 2.2: the text conditioning is dropped "10% of the time",
  `model.caption_dropout`), in evaluation the example's noise seed.
- Host, per process-local batch (batch_fn): the frozen CLIP of `config.clip_workdir`, jitted on
  the host, gives the caption's token states, mask and L2-normalised text embedding and (from
  images) the image embedding; both embeddings are standardised per dimension with the run's
  statistics (dalle_jax/unclip/embedding_stats.py), the image embedding becoming the `target`.
- Statistics: measured at the start of the first run on `model.stats_examples` training
  examples (or taken from the embedding shards' own file), written once into the workdir by
  process 0 and read back by every later run and by dalle_jax.unclip.api.Prior.
- Device (loss): diffusion_task's loss with the prior's x0 prediction (section 2.2: "we find it
  better to train our model to predict the unnoised z_i directly") and optional min-SNR weights.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clip_jax import model as clip_model
from clip_jax.api import CLIPModel
from core_jax import storage
from core_jax.config import base_config
from core_jax.data import image_ops
from core_jax.data.embedding_shards import read_index
from core_jax.errors import ConfigError
from core_jax.trainer import Evaluator, Task, eval_batches, host_eval_batches
from dalle_jax.unclip import embedding_stats, prior, prior_sample
from dalle_jax.unclip.decoder_task import CLIP_SIZES, dropout_rate, image_and_caption, load_clip
from dalle_jax.unclip.diffusion_task import (
    check_sample,
    diffusion_section,
    draw_noise_seed,
    make_loss_evaluator,
    make_loss_fn,
    noise_schedule,
    sample_section,
    sampler_options,
)

EMBEDDINGS_SOURCE = "embeddings"
STATS_BATCH = 256  # examples per CLIP call while measuring the statistics


def prior_config():
    """base_config() + the prior's sections with defaults (unlocked; config files lock it)."""
    c = base_config()
    c.task = "dalle_jax.unclip.prior_task"
    c.model = ml_collections.ConfigDict(
        dict(
            width=256,
            num_layers=4,
            num_heads=4,
            mlp_ratio=4.0,
            clip_dim=0,  # CLIP embedding width; 0 = the CLIP's (written back, so config.json holds it)
            text_width=0,  # caption token states' width; 0 = the CLIP's text width
            text_length=0,  # caption tokens; 0 = the CLIP's context length
            caption_dropout=0.1,  # section 2.2: text conditioning dropped 10% of the time
            stats_examples=4096,  # training examples the embedding statistics are measured on
            eval_max_batches=4,  # eval-split batches of the held-out loss; -1 = all, 0 = none
            eval_sample_batches=1,  # eval-split batches sampled for eval/<split>_samples; 0 = none
        )
    )
    c.diffusion = diffusion_section()
    c.diffusion.prediction = "x0"  # section 2.2: the prior predicts the unnoised embedding
    c.sample = sample_section("ddim", 64)  # Table 3: 64 sampling steps for the diffusion prior
    c.sample.preview_images = 0  # the prior draws embeddings, not images
    c.sample.best_of = 2  # section 2.2: two samples, the one closer to the text embedding kept
    c.clip_workdir = ""  # the trained CLIP whose embeddings the prior models (required to train)
    c.clip_step = -1  # that CLIP's checkpoint; -1 = its newest (written back)
    c.data.image_size = 0  # images are read at the CLIP's input size; 0 = take it (written back)
    return c


def resolve_clip_sizes(config, clip: CLIPModel) -> None:
    """Fills the 0 sizes (clip_dim, text_width, text_length, data.image_size) from the CLIP and
    checks the others against it."""
    for key, (section, name) in CLIP_SIZES.items():
        value, given = int(clip.config[section][name]), int(config.model[key])
        if given == 0:
            config.model[key] = value
        elif given != value:
            raise ConfigError(
                f"config.model.{key}={given} but the CLIP in {config.clip_workdir} has {value}; "
                f"set it to {value} or to 0 (= the CLIP's)"
            )
    if int(config.data.image_size) == 0:
        config.data.image_size = clip.image_size


def prior_spec(config) -> prior.PriorSpec:
    """The checked PriorSpec of `config.model` (ConfigError when a size is missing or wrong)."""
    m = config.model
    missing = [key for key in CLIP_SIZES if int(m[key]) <= 0]
    if missing:
        raise ConfigError(
            f"config.model.{', '.join(missing)} must be set to build the prior without its CLIP "
            "(core_jax.aot loads none); 0 takes them from config.clip_workdir when training"
        )
    return prior.check_spec(
        prior.PriorSpec(
            width=int(m.width),
            num_layers=int(m.num_layers),
            num_heads=int(m.num_heads),
            clip_dim=int(m.clip_dim),
            text_width=int(m.text_width),
            text_length=int(m.text_length),
            mlp_ratio=float(m.mlp_ratio),
            dtype=str(config.get("compute_dtype", "float32")),
            remat=str(config.get("remat", "none")),
            scan_layers=bool(config.get("scan_layers", True)),
        )
    )


def use_embedding_shards(config) -> bool:
    """Whether the examples are pre-computed embeddings: `data.embeddings_dir` set switches the
    data source to them (written back, so config.json says what the run read)."""
    if str(config.data.get("embeddings_dir", "") or ""):
        config.data.source = EMBEDDINGS_SOURCE
    return config.data.source == EMBEDDINGS_SOURCE


def check_shards_clip(config) -> None:
    """ConfigError unless the embedding shards were encoded with config.clip_workdir's checkpoint:
    the prior reads their image embeddings but computes the caption states with that CLIP."""
    try:
        index = read_index(str(config.data.embeddings_dir))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    here = (storage.absolute(str(config.clip_workdir)), int(config.clip_step))
    there = (str(index.get("clip_workdir", "")), int(index.get("clip_step", -1)))
    if here != there:
        raise ConfigError(
            f"data.embeddings_dir={config.data.embeddings_dir} was encoded with the CLIP {there[0]} "
            f"at step {there[1]}, not config.clip_workdir {here[0]} at step {here[1]}"
        )


def make_example_fn(config, tokenizer, *, train: bool, shards: bool):
    """raw example -> {text int32 [L], image uint8 [C, C, 3] or image_embedding float32 [E]} plus
    `caption_kept` (training) or `noise_seed` (evaluation)."""
    size = int(config.data.image_size)
    random_crop = train and bool(config.data.random_crop)
    caption_dropout = dropout_rate(config.model, "caption_dropout") if train else 0.0
    # No random flips: captions name left and right ("a circle to the left of ...").

    def example_fn(raw, rng):
        if shards:
            out = {
                "text": np.asarray(raw["text_tokens"], np.int32),
                "image_embedding": raw["image_embedding"],
            }
        else:
            out = image_and_caption(raw, rng, tokenizer, size, random_crop=random_crop, train=train)
        if train:
            out["caption_kept"] = np.float32(rng.random() >= caption_dropout)
        else:
            out["noise_seed"] = draw_noise_seed(rng)
        return out

    return example_fn


def clip_embeddings(module, params, tokens, images=None):
    """(text states [B, L, W] float32, their mask [B, L], unit text embeddings [B, E], unit image
    embeddings [B, E] or None) from CLIP tokens and CLIP-normalised images; pure, jit-able."""
    states, text = clip_model.encode_text_tokens(module, params, tokens)
    image = None if images is None else clip_model.encode_image(module, params, images).astype(jnp.float32)
    return states.astype(jnp.float32), clip_model.text_token_mask(tokens), text.astype(jnp.float32), image


def make_embed_fn(clip: CLIPModel):
    """Host, per batch: tokens (and images) -> text_states, text_mask and the unit embeddings
    `text_embedding` and `image_embedding` (kept as they are when the batch brings them)."""
    encode = jax.jit(functools.partial(clip_embeddings, clip.module))

    def embed(batch: dict) -> dict:
        batch = dict(batch)
        images = batch.pop("image", None)
        if images is not None:
            images = image_ops.clip_normalize(images)
        # On this process's device whatever mesh the caller has set (an evaluator runs this under
        # the training mesh, which the CLIP's params are not on).
        with jax.set_mesh(None):
            states, mask, text, image = encode(clip.params, batch.pop("text"), images)
        batch.update(
            text_states=np.asarray(states), text_mask=np.asarray(mask), text_embedding=np.asarray(text)
        )
        if image is not None:
            batch["image_embedding"] = np.asarray(image)
        return batch

    return embed


def make_batch_fn(embed, stats: dict):
    """embed, then both embeddings standardised; the image embedding becomes `target`."""

    def batch_fn(batch: dict) -> dict:
        batch = embed(batch)
        image = batch.pop("image_embedding")
        batch["target"] = embedding_stats.standardise(image, stats, "image").astype(np.float32)
        batch["text_embedding"] = embedding_stats.standardise(batch["text_embedding"], stats, "text").astype(
            np.float32
        )
        return batch

    return batch_fn


def measure_stats(config, embed, example_fn) -> dict:
    """Statistics of the first `model.stats_examples` examples of the training split, read in order
    and unaugmented by every process alike (so all of them agree without talking)."""
    n = int(config.model.stats_examples)
    if n < 2:
        raise ConfigError(f"config.model.stats_examples must be at least 2, got {n}")
    acc = embedding_stats.StatsAccumulator()
    batches = host_eval_batches(
        config.data, config.data.split, example_fn, batch_size=min(STATS_BATCH, n), seed=config.seed
    )
    for local in batches:
        out = embed(local)
        kept = np.flatnonzero(local["_mask"])[: n - acc.count]
        acc.add(out["image_embedding"][kept], out["text_embedding"][kept])
        if acc.count >= n:
            batches.close()
            break
    try:
        return acc.result()
    except ValueError as e:
        raise ConfigError(f"config.data.split={config.data.split!r}: {e}") from None


def run_stats(config, workdir: str, embed, example_fn) -> dict:
    """The run's embedding statistics: the workdir's file when it has one (a resumed run), else
    the embedding shards' file, else measured now; written into the workdir by process 0. A file
    made for another CLIP is refused, so a workdir never mixes two CLIPs' scales."""
    clip_dim = int(config.model.clip_dim)
    made_for = {"clip_workdir": str(config.clip_workdir), "clip_step": int(config.clip_step)}
    try:
        stats = embedding_stats.load_stats(workdir, clip_dim)
    except FileNotFoundError:
        stats = None
    except ValueError as e:
        raise ConfigError(f"{e}; delete it (it is measured again) or pick a new --workdir") from None
    if stats is not None:
        for key, value in made_for.items():
            if key in stats and str(stats[key]) != str(value):
                raise ConfigError(
                    f"{embedding_stats.stats_path(workdir)} was measured with {key}={stats[key]}, "
                    f"this run has {value}: resume with the CLIP it was trained on or pick a new --workdir"
                )
        return stats
    shards_dir = str(config.data.get("embeddings_dir", "") or "")
    try:
        stats = embedding_stats.load_stats(shards_dir, clip_dim) if shards_dir else None
    except FileNotFoundError:
        stats = None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if stats is None:
        stats = measure_stats(config, embed, example_fn)
    stats = dict(stats, **made_for)
    if jax.process_index() == 0:
        embedding_stats.save_stats(workdir, stats)
    return embedding_stats.load_stats(workdir, clip_dim) if jax.process_index() == 0 else stats


def train_condition(batch: dict) -> dict:
    return {key: batch[key] for key in (*prior_sample.CONDITION_KEYS, "caption_kept")}


def eval_condition(batch: dict) -> dict:
    return {key: batch[key] for key in prior_sample.CONDITION_KEYS}


def dropout_metrics(batch: dict) -> dict:
    return {"captions_dropped": 1.0 - batch["caption_kept"].astype(jnp.float32).mean()}


def make_sample_evaluator(config, model, schedule, example_fn, batch_fn, stats) -> Evaluator:
    """`eval/<eval_split>_samples/`: embeddings sampled (config.sample) for the captions of
    `model.eval_sample_batches` eval batches, de-standardised and L2-normalised; `cos_true` is
    their mean cosine with the true image embeddings, `cos_other` with another example's (the
    batch rolled by one), so a prior that reads its caption has cos_true well above cos_other."""
    s = config.sample
    draw = jax.jit(
        functools.partial(
            prior_sample.sample_prior,
            model,
            schedule,
            **sampler_options(config, s.steps),
        )
    )
    image_mean, image_std = jnp.asarray(stats["image_mean"]), jnp.asarray(stats["image_std"])

    def unit(x):
        return prior_sample.l2_normalize(x * image_std + image_mean)

    def fn(params, step):
        del step
        sums, rows = np.zeros(2), 0.0
        for i, b in enumerate(
            eval_batches(
                config,
                params,
                example_fn,
                max_batches=int(config.model.eval_sample_batches),
                batch_fn=batch_fn,
            )
        ):
            x_T = jax.random.normal(jax.random.key(i), b["target"].shape, jnp.float32)
            z = unit(draw(params, eval_condition(b), x_T, jax.random.key(10_000 + i)))
            true = unit(b["target"])
            cos = jnp.stack([(z * true).sum(-1), (z * jnp.roll(true, 1, axis=0)).sum(-1)])
            kept = b["_mask"].astype(jnp.float32)
            sums += np.asarray(jax.device_get((cos * kept).sum(-1)))
            rows += float(kept.sum())
        if not rows:
            raise RuntimeError(f"prior sample evaluator: split {config.data.eval_split!r} gave no examples")
        return {"cos_true": sums[0] / rows, "cos_other": sums[1] / rows}

    return Evaluator(name=f"{config.data.eval_split}_samples", fn=fn)


def make_task(config, workdir: str | None = None) -> Task:
    """Loads the CLIP and the run's statistics (unless workdir is None: core_jax.aot needs shapes
    only) and returns the Task."""
    shards = use_embedding_shards(config)
    clip = None
    if workdir is not None:
        clip = load_clip(config, "the prior draws a trained CLIP's image embeddings from its text")
        resolve_clip_sizes(config, clip)
        if shards:
            check_shards_clip(config)
    spec = prior_spec(config)
    model = prior.PriorTransformer(spec)
    schedule = noise_schedule(config)
    check_sample(config, schedule)
    if int(config.sample.best_of) < 1:
        raise ConfigError(f"config.sample.best_of must be >= 1, got {config.sample.best_of}")
    dropout_rate(config.model, "caption_dropout")

    def init_fn(rng, batch):
        return {"params": prior.init_params(model, rng)}

    def batch_spec(batch_size):
        e = spec.clip_dim
        return {
            "target": jax.ShapeDtypeStruct((batch_size, e), jnp.float32),
            "text_embedding": jax.ShapeDtypeStruct((batch_size, e), jnp.float32),
            "text_states": jax.ShapeDtypeStruct((batch_size, spec.text_length, spec.text_width), jnp.float32),
            "text_mask": jax.ShapeDtypeStruct((batch_size, spec.text_length), jnp.bool_),
            "caption_kept": jax.ShapeDtypeStruct((batch_size,), jnp.float32),
        }

    common = dict(
        init_fn=init_fn,
        loss_fn=make_loss_fn(model, schedule, config, train_condition, dropout_metrics),
        accumulation="mean",
        flops_per_example=prior.train_flops_per_example(spec),
        batch_spec=batch_spec,
    )
    if clip is None:
        return Task(example_fn=None, **common)
    embed = make_embed_fn(clip)
    stats_example_fn = make_example_fn(config, clip.tokenizer, train=False, shards=shards)
    stats = run_stats(config, workdir, embed, stats_example_fn)
    batch_fn = make_batch_fn(embed, stats)
    evaluators = []
    if int(config.model.eval_max_batches) != 0:
        evaluators.append(
            make_loss_evaluator(config, model, schedule, stats_example_fn, batch_fn, eval_condition)
        )
    if int(config.model.eval_sample_batches) > 0:
        evaluators.append(make_sample_evaluator(config, model, schedule, stats_example_fn, batch_fn, stats))
    return Task(
        example_fn=make_example_fn(config, clip.tokenizer, train=True, shards=shards),
        evaluators=evaluators,
        batch_fn=batch_fn,
        **common,
    )
