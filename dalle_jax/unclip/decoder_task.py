"""The unCLIP decoder (Ramesh et al. 2022, section 2.1) as a `core_jax.trainer.Task`: a diffusion
U-Net that draws an image from its CLIP image embedding and, optionally, its caption.

- Host, per example (example_fn): the image at the CLIP's input size (uint8), its caption as CLIP
  tokens, and the guidance-dropout flags `clip_kept` / `caption_kept`, drawn from the example's own
  rng (seed, record, epoch) as the DALL-E task draws its caption dropout, so which examples lose
  their conditioning does not depend on the number of processes. Section 2.1 enables guidance "by
  randomly setting the CLIP embeddings to zero (or a learned embedding) 10% of the time, and
  randomly dropping the text caption 50% of the time during training" (`model.clip_dropout`,
  `model.caption_dropout`); we use the zero embedding.
- Host, per process-local batch (batch_fn): the frozen CLIP of `config.clip_workdir`, jitted on
  the host as the DALL-E task runs its dVAE, gives the L2-normalised image embedding and the
  caption's token states and mask; the target is the image area-downsampled to model.image_size,
  in [-1, 1].
- Device (loss): t ~ U{0..T-1}, noise, x_t = q_sample(x0, t, noise), the U-Net's prediction from
  x_t with the embedding times clip_kept and the caption mask and caption_kept, the diffusion loss
  per example, meaned over the batch (so gradient accumulation keeps the objective).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import model as clip_model
from clip_jax.api import CLIPModel
from core_jax import checkpoint
from core_jax.config import base_config
from core_jax.data import image_ops
from core_jax.data.decode import example_caption
from core_jax.errors import ConfigError
from core_jax.metrics import image_grid
from core_jax.sharded_inference import gather
from core_jax.trainer import Task
from core_jax.workdir_kinds import read_workdir_config
from dalle_jax.unclip import denoise, pixels, unet
from dalle_jax.unclip.diffusion_task import (
    check_sample,
    diffusion_section,
    dit_section,
    draw_noise_seed,
    make_loss_evaluator,
    make_loss_fn,
    noise_schedule,
    sample_section,
    sampler_options,
    network,
    train_flops_per_example,
    unet_section,
)

CLIP_TASK = "clip_jax.task"
CONDITION_KEYS = ("clip_embedding", "text_states", "text_mask")
# Sizes that come from the CLIP (0 in a config = take the CLIP's): model key -> where the CLIP's
# config holds it.
CLIP_SIZES = {
    "clip_dim": ("model", "embed_dim"),
    "text_width": ("model", "text_width"),
    "text_length": ("text", "context_length"),
}


def decoder_config():
    """base_config() + the decoder's sections with defaults (unlocked; config files lock it)."""
    c = base_config()
    c.task = "dalle_jax.unclip.decoder_task"
    c.model = unet_section(
        clip_dim=0,  # CLIP image embedding width; 0 = the CLIP's (written back, so config.json holds it)
        text_width=0,  # caption token states' width; 0 = the CLIP's text width
        text_length=0,  # caption tokens; 0 = the CLIP's context length
        clip_tokens=4,  # section 2.1: the embedding is also projected into "four extra tokens of context"
        clip_dropout=0.1,  # section 2.1: embedding zeroed 10% of the time (guidance's null)
        caption_dropout=0.5,  # section 2.1: caption dropped 50% of the time
        # "unet": the paper's (GLIDE's) U-Net, sized by the keys above; "dit": a diffusion
        # transformer (dalle_jax/unclip/dit.py) sized by model.dit, with the same conditioning.
        architecture="unet",
        dit=dit_section(),
    )
    c.diffusion = diffusion_section()
    # DPM-Solver++ reaches a sample in fewest steps (docs/unclip.md); guidance 3 is our choice (the
    # paper's MS-COCO FID uses decoder guidance 1.25, Table 2).
    c.sample = sample_section("dpmpp", 25, cond_scale=3.0)
    c.clip_workdir = ""  # the trained CLIP whose embeddings the decoder inverts (required to train)
    c.clip_step = -1  # that CLIP's checkpoint; -1 = its newest (written back)
    c.data.image_size = 0  # images are read at the CLIP's input size; 0 = take it (written back)
    return c


def dropout_rate(model_config, key: str) -> float:
    rate = float(model_config[key])
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"config.model.{key} must be in [0, 1), got {rate}")
    return rate


def load_clip(config, needs: str = "the decoder draws images from a trained CLIP's embeddings") -> CLIPModel:
    """The frozen CLIP of config.clip_workdir (its EMA weights when it kept one) at
    config.clip_step, which is written back when it was -1 (the newest). `needs` says why a
    missing one is an error."""
    workdir = str(config.get("clip_workdir", "") or "")
    if not workdir:
        raise ConfigError(
            f"config.clip_workdir is empty: {needs}; "
            "train one (python -m clip_jax.train --config configs/clip_shapes.py --workdir W) and "
            "pass --config.clip_workdir=W"
        )
    read_workdir_config(workdir, CLIP_TASK, ConfigError)
    latest = checkpoint.latest_step(workdir)
    if latest is None:
        raise ConfigError(f"config.clip_workdir: {workdir} holds no checkpoint")
    if int(config.clip_step) < 0:
        config.clip_step = latest
    try:
        return CLIPModel.load(workdir, int(config.clip_step))
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config.clip_workdir: cannot load the CLIP in {workdir}: {e}") from None


def resolve_clip_sizes(config, clip: CLIPModel) -> None:
    """Fills the 0 sizes from the CLIP (clip_dim, text_width, text_length, data.image_size) and
    checks the others against it."""
    found = {key: int(clip.config[section][name]) for key, (section, name) in CLIP_SIZES.items()}
    for key, value in found.items():
        given = int(config.model[key])
        if given == 0:
            config.model[key] = value
        elif given != value:
            raise ConfigError(
                f"config.model.{key}={given} but the CLIP in {config.clip_workdir} has {value}; "
                f"set it to {value} or to 0 (= the CLIP's)"
            )
    if int(config.data.image_size) == 0:
        config.data.image_size = clip.image_size
    elif int(config.data.image_size) != clip.image_size:
        raise ConfigError(
            f"config.data.image_size={config.data.image_size} but the CLIP reads {clip.image_size}x"
            f"{clip.image_size} images; set it to {clip.image_size} or to 0 (= the CLIP's)"
        )
    if int(config.model.image_size) > clip.image_size:
        raise ConfigError(
            f"config.model.image_size={config.model.image_size} exceeds the CLIP's input size "
            f"{clip.image_size}: the decoder's target is the CLIP's input, downsampled"
        )


def conditioning_sizes(config) -> dict:
    """The U-Net's conditioning widths; ConfigError when a size is still 0 (no CLIP to take it from)."""
    m = config.model
    missing = [key for key in CLIP_SIZES if int(m[key]) <= 0]
    if missing:
        raise ConfigError(
            f"config.model.{', '.join(missing)} must be set to build the decoder without its CLIP "
            "(core_jax.aot loads none); 0 takes them from config.clip_workdir when training"
        )
    return dict(clip_dim=int(m.clip_dim), clip_tokens=int(m.clip_tokens), text_width=int(m.text_width))


def image_and_caption(raw, rng, tokenizer, size: int, *, random_crop: bool, train: bool) -> dict:
    """{image uint8 [size, size, 3], text int32 [L]} of a raw example: one of its captions (a random
    one in training, else the first) and the image resized and cropped for the CLIP; an example
    without a caption is a counted skip."""
    caption = example_caption(raw, rng, train)
    image = image_ops.resize_and_crop(np.asarray(raw["image"]), size, random_crop, rng)
    return {
        "image": np.ascontiguousarray(image),
        "text": np.asarray(tokenizer.encode([caption])[0], np.int32),
    }


def make_example_fn(config, tokenizer, *, train: bool):
    """raw example -> {image uint8 [C, C, 3] at the CLIP's size, text int32 [L]} plus the
    guidance-dropout flags (training) or the evaluation noise seed."""
    size = int(config.data.image_size)
    random_crop = train and bool(config.data.random_crop)
    clip_dropout = dropout_rate(config.model, "clip_dropout") if train else 0.0
    caption_dropout = dropout_rate(config.model, "caption_dropout") if train else 0.0
    # No random flips: captions name left and right ("a circle to the left of ...").

    def example_fn(raw, rng):
        out = image_and_caption(raw, rng, tokenizer, size, random_crop=random_crop, train=train)
        if train:
            out["clip_kept"] = np.float32(rng.random() >= clip_dropout)
            out["caption_kept"] = np.float32(rng.random() >= caption_dropout)
        else:
            out["noise_seed"] = draw_noise_seed(rng)
        return out

    return example_fn


def clip_conditioning(module, params, images, tokens):
    """(L2-normalised image embeddings [B, E], caption token states [B, L, W] float32, their
    mask bool [B, L]) from CLIP-normalised images and CLIP tokens; pure, jit-able."""
    embedding = clip_model.encode_image(module, params, images)
    states, _ = clip_model.encode_text_tokens(module, params, tokens)
    return embedding.astype(jnp.float32), states.astype(jnp.float32), clip_model.text_token_mask(tokens)


def make_batch_fn(clip: CLIPModel, image_size: int):
    """Host, per process-local batch: images and tokens -> the CLIP conditioning and the target,
    in one jitted CLIP call."""
    encode = jax.jit(functools.partial(clip_conditioning, clip.module))

    def batch_fn(batch: dict) -> dict:
        batch = dict(batch)
        images, tokens = batch.pop("image"), batch.pop("text")
        # On this process's device whatever mesh the caller has set: an evaluator runs this under
        # the training mesh, which the CLIP's params are not on.
        with jax.set_mesh(None):
            embedding, states, mask = encode(clip.params, image_ops.clip_normalize(images), tokens)
        batch.update(
            clip_embedding=np.asarray(embedding),
            text_states=np.asarray(states),
            text_mask=np.asarray(mask),
            target=pixels.to_model(pixels.area_resize(images, image_size)),
        )
        return batch

    return batch_fn


def train_condition(batch: dict) -> dict:
    """The U-Net's conditioning with the example's guidance dropout applied: a dropped embedding
    is zero, a dropped caption fully masked (the null condition guidance samples with)."""
    return {
        "clip_embedding": batch["clip_embedding"] * batch["clip_kept"][:, None].astype(jnp.float32),
        "text_states": batch["text_states"],
        "text_mask": batch["text_mask"] & (batch["caption_kept"][:, None] > 0),
    }


def eval_condition(batch: dict) -> dict:
    return {key: batch[key] for key in CONDITION_KEYS}


def dropout_metrics(batch: dict) -> dict:
    return {
        "clip_dropped": 1.0 - batch["clip_kept"].astype(jnp.float32).mean(),
        "captions_dropped": 1.0 - batch["caption_kept"].astype(jnp.float32).mean(),
    }


def make_image_fn(config, model, schedule):
    """The logged preview: the batch's first images (top row) next to decodes of their CLIP
    embeddings and captions (bottom row), with config.sample's sampler, guidance and
    `preview_steps` steps from a fixed noise."""
    s = config.sample
    size = int(config.model.image_size)
    draw = jax.jit(
        functools.partial(
            denoise.sample_decoder,
            model,
            schedule,
            **sampler_options(config, s.preview_steps),
        )
    )

    def image_fn(params, batch):
        rows = min(int(s.preview_images), batch["target"].shape[0])
        cond = {key: gather(batch[key])[:rows] for key in CONDITION_KEYS}
        x_T = denoise.start_noise(jax.random.key(0), (rows, size, size, 3))
        decoded = gather(draw(params, cond, x_T, jax.random.key(1)))[:rows]
        originals = gather(batch["target"])[:rows]
        images = np.concatenate([pixels.to_uint8(originals), pixels.to_uint8(decoded)])
        return {"decodes": image_grid(images, rows=2)}

    return image_fn


def make_task(config, workdir: str | None = None) -> Task:
    """Loads the CLIP (unless workdir is None: core_jax.aot needs shapes only) and returns the Task."""
    clip = None
    if workdir is not None:
        clip = load_clip(config)
        resolve_clip_sizes(config, clip)
    model = network(config, **conditioning_sizes(config))
    schedule = noise_schedule(config)
    check_sample(config, schedule)
    for key in ("clip_dropout", "caption_dropout"):
        dropout_rate(config.model, key)
    size, text_length = int(config.model.image_size), int(config.model.text_length)

    def init_fn(rng, batch):
        return {"params": unet.init_params(model, rng)}

    def batch_spec(batch_size):
        spec = model.spec
        return {
            "target": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
            "clip_embedding": jax.ShapeDtypeStruct((batch_size, spec.clip_dim), jnp.float32),
            "text_states": jax.ShapeDtypeStruct((batch_size, text_length, spec.text_width), jnp.float32),
            "text_mask": jax.ShapeDtypeStruct((batch_size, text_length), jnp.bool_),
            "clip_kept": jax.ShapeDtypeStruct((batch_size,), jnp.float32),
            "caption_kept": jax.ShapeDtypeStruct((batch_size,), jnp.float32),
        }

    common = dict(
        init_fn=init_fn,
        loss_fn=make_loss_fn(model, schedule, config, train_condition, dropout_metrics),
        accumulation="mean",
        flops_per_example=train_flops_per_example(model.spec, text_length=text_length),
        batch_spec=batch_spec,
    )
    if clip is None:
        return Task(example_fn=None, **common)
    batch_fn = make_batch_fn(clip, size)
    evaluators = []
    if int(config.model.eval_max_batches) != 0:
        eval_example_fn = make_example_fn(config, clip.tokenizer, train=False)
        evaluators.append(
            make_loss_evaluator(config, model, schedule, eval_example_fn, batch_fn, eval_condition)
        )
    return Task(
        example_fn=make_example_fn(config, clip.tokenizer, train=True),
        evaluators=evaluators,
        image_fn=make_image_fn(config, model, schedule) if int(config.sample.preview_images) > 0 else None,
        batch_fn=batch_fn,
        **common,
    )
