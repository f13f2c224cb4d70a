"""What the unCLIP decoder and upsampler tasks share: their config sections, the U-Net and noise
schedule a config names, the diffusion loss of a batch, the held-out loss evaluator, and the check
that a workdir holds the model a loader expects.

Batches hold `target` float32 [B, S, S, 3], the clean image in [-1, 1], plus each task's
conditioning; evaluation batches also `noise_seed` int32 [B], from which every example draws its
own timestep and noise, so the held-out loss is the same number at every evaluation of the same
params, whatever the batch size or mesh.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from core_jax.errors import ConfigError
from core_jax.trainer import Evaluator, eval_batches
from dalle_jax.unclip import samplers
from dalle_jax.unclip.dit import DiT, DiTSpec, check_dit_spec
from dalle_jax.unclip.dit import forward_flops as dit_forward_flops
from dalle_jax.unclip.schedule import (
    check_prediction,
    diffusion_loss,
    make_schedule,
    q_sample,
    sample_timesteps,
)
from dalle_jax.unclip.unet import UNet
from dalle_jax.unclip.unet_spec import PRESETS, UNetSpec, check_spec
from dalle_jax.unclip.unet_spec import train_flops_per_example as unet_train_flops

# Folded with an example's noise_seed into the key of its evaluation timestep and noise.
EVAL_NOISE_KEY = 20220413


def unet_section(**values) -> ml_collections.ConfigDict:
    """`config.model`'s U-Net keys (UNetSpec fields; compute dtype and remat come from the
    trainer-wide `compute_dtype` and `remat`), with the given values over small defaults."""
    section = dict(
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        image_size=32,
        attention_resolutions=(16, 8),
        head_channels=32,
        dropout=0.0,
        norm_groups=16,
        eval_max_batches=4,  # eval-split batches per evaluation; -1 = all, 0 = no evaluator
    )
    section.update(values)
    return ml_collections.ConfigDict(section)


def apply_preset(model_section, name: str) -> None:
    """Sets the keys of `model_section` that a `unet_spec.PRESETS` network (the paper's sizes) fixes."""
    values = dataclasses.asdict(PRESETS[name])
    model_section.update({key: value for key, value in values.items() if key in model_section})


def diffusion_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            # unCLIP appendix C, Table 3: 1000 diffusion steps, the cosine schedule (linear for
            # the 256 -> 1024 upsampler).
            schedule="cosine",
            timesteps=1000,
            prediction="eps",  # eps | x0 | v (dalle_jax/unclip/schedule.py)
            min_snr_gamma=0.0,  # > 0: min-SNR loss weights (Hang et al. 2023, gamma 5); 0 = off
        )
    )


def sample_section(sampler: str, steps: int, cond_scale: float = 1.0) -> ml_collections.ConfigDict:
    """Sampling defaults for the API and the images logged at evaluation (`preview_*`)."""
    return ml_collections.ConfigDict(
        dict(
            sampler=sampler,  # ddpm | ddim | dpmpp
            steps=steps,
            cond_scale=cond_scale,  # classifier-free guidance; 1 = unguided
            eta=0.0,  # ddim only: 0 deterministic, 1 = ddpm
            preview_images=8,  # 0 = no preview
            preview_steps=10,  # few steps: a preview, cheap to run at every evaluation
        )
    )


def sampler_options(config, steps: int, guided: bool = True) -> dict:
    """config.sample's sampler, eta (and guidance scale) with `steps`, and the trained prediction:
    the keyword arguments of the samplers in denoise.py and prior_sample.py."""
    s = config.sample
    options = dict(sampler=str(s.sampler), steps=int(steps), eta=float(s.eta))
    options["prediction"] = str(config.diffusion.prediction)
    if guided:
        options["cond_scale"] = float(s.cond_scale)
    return options


def unet_spec(config, **conditioning) -> UNetSpec:
    """The checked UNetSpec of `config.model` (ConfigError naming what does not build)."""
    m = config.model
    spec = UNetSpec(
        model_channels=int(m.model_channels),
        channel_mult=tuple(int(x) for x in m.channel_mult),
        num_res_blocks=int(m.num_res_blocks),
        image_size=int(m.image_size),
        attention_resolutions=tuple(int(x) for x in m.attention_resolutions),
        head_channels=int(m.head_channels),
        dropout=float(m.dropout),
        norm_groups=int(m.norm_groups),
        dtype=str(config.get("compute_dtype", "float32")),
        remat=str(config.get("remat", "none")),
        **conditioning,
    )
    return check_spec(spec)


def dit_section(**values) -> ml_collections.ConfigDict:
    """`config.model.dit`: the DiT's sizes when `config.model.architecture` is "dit"."""
    section = dict(patch_size=4, width=128, depth=6, num_heads=4, mlp_ratio=4.0)
    section.update(values)
    return ml_collections.ConfigDict(section)


def dit_spec(config, clip_dim: int = 0, clip_tokens: int = 4, text_width: int = 0) -> DiTSpec:
    """The checked DiTSpec of `config.model` (image size, conditioning) and `config.model.dit`."""
    m, d = config.model, config.model.dit
    if float(m.get("dropout", 0.0)):
        raise ConfigError("config.model.dropout: the DiT has no dropout; set it to 0 with architecture='dit'")
    spec = DiTSpec(
        image_size=int(m.image_size),
        patch_size=int(d.patch_size),
        width=int(d.width),
        depth=int(d.depth),
        num_heads=int(d.num_heads),
        mlp_ratio=float(d.mlp_ratio),
        clip_dim=clip_dim,
        clip_tokens=clip_tokens,
        text_width=text_width,
        dtype=str(config.get("compute_dtype", "float32")),
        remat=str(config.get("remat", "none")),
    )
    return check_dit_spec(spec)


ARCHITECTURES = ("unet", "dit")


def network(config, **conditioning):
    """The denoising network `config.model.architecture` names: the U-Net (the paper's) or a DiT."""
    arch = str(config.model.get("architecture", "unet"))
    if arch == "unet":
        return UNet(unet_spec(config, **conditioning))
    if arch == "dit":
        return DiT(dit_spec(config, **conditioning))
    raise ConfigError(f"config.model.architecture must be one of {ARCHITECTURES}, got {arch!r}")


def train_flops_per_example(spec, text_length: int = 0) -> float:
    """Forward + backward FLOPs of one training example (3x the forward), for MFU reports."""
    if isinstance(spec, DiTSpec):
        return 3.0 * dit_forward_flops(spec, text_length=text_length)
    return unet_train_flops(spec, text_length=text_length)


def noise_schedule(config):
    """The training process `config.diffusion` names, its prediction type and min-SNR gamma checked."""
    d = config.diffusion
    check_prediction(str(d.prediction))
    if float(d.min_snr_gamma) < 0:
        raise ConfigError(f"config.diffusion.min_snr_gamma must be >= 0 (0 = off), got {d.min_snr_gamma}")
    return make_schedule(str(d.schedule), int(d.timesteps))


def check_sample(config, schedule) -> None:
    """ConfigError for `config.sample` values no sampler takes."""
    s = config.sample
    if s.sampler not in samplers.SAMPLERS:
        raise ConfigError(
            f"config.sample.sampler must be one of {', '.join(samplers.SAMPLERS)}, got {s.sampler!r}"
        )
    if int(s.preview_images) < 0:
        raise ConfigError(f"config.sample.preview_images must be >= 0 (0 = none), got {s.preview_images}")
    for key in ("steps", "preview_steps"):
        if not 1 <= int(s[key]) <= schedule.num_train_steps:
            raise ConfigError(
                f"config.sample.{key} must be in [1, {schedule.num_train_steps}] (diffusion.timesteps), got {s[key]}"
            )
    if not 0.0 <= float(s.eta) <= 1.0 or (float(s.eta) and s.sampler != "ddim"):
        raise ConfigError(
            f"config.sample.eta must be in [0, 1] and is for the ddim sampler only, got {s.eta}"
        )
    if float(s.get("cond_scale", 1.0)) < 0:
        raise ConfigError(f"config.sample.cond_scale must be >= 0 (1 = unguided), got {s.cond_scale}")


def per_example_loss(model, schedule, config, params, x0, t, noise, cond: dict, dropout_rng=None):
    """float32 [B]: the network's error on x0 noised to t with `noise` (schedule.diffusion_loss,
    with config.diffusion's prediction type and min-SNR weights); dropout with `dropout_rng`."""
    d = config.diffusion
    x_t = q_sample(schedule, x0, t, noise)
    output = model.apply(
        {"params": params},
        x_t,
        t,
        **cond,
        deterministic=dropout_rng is None,
        rngs=None if dropout_rng is None else {"dropout": dropout_rng},
    )
    gamma = float(d.min_snr_gamma)
    return diffusion_loss(schedule, output, x0, noise, t, str(d.prediction), gamma if gamma > 0 else None)


def make_loss_fn(model, schedule, config, train_condition, metrics_fn=None):
    """The trainer's loss: the mean over the batch of per_example_loss at t ~ U{0..T-1} and
    standard normal noise (Ho et al. 2020, Algorithm 1). `train_condition(batch)` -> the U-Net's
    conditioning keywords; `metrics_fn(batch)` -> extra scalars."""
    use_dropout = model.spec.dropout > 0

    def loss_fn(params, batch, rng, step):
        del step
        x0 = batch["target"]
        rng_t, rng_noise, rng_dropout = jax.random.split(rng, 3)
        t = sample_timesteps(rng_t, x0.shape[0], schedule)
        noise = jax.random.normal(rng_noise, x0.shape, jnp.float32)
        loss = per_example_loss(
            model,
            schedule,
            config,
            params,
            x0,
            t,
            noise,
            train_condition(batch),
            rng_dropout if use_dropout else None,
        )
        return loss.mean(), (metrics_fn(batch) if metrics_fn else {})

    return loss_fn


def draw_noise_seed(rng: np.random.Generator) -> np.int32:
    """An evaluation example's noise seed, from its own (deterministic) example rng."""
    return np.int32(rng.integers(2**31 - 1))


def eval_noise(seeds, shape, schedule):
    """(t int32 [B], noise float32 [B, *shape]), each row a function of its seed alone."""
    base = jax.random.key(EVAL_NOISE_KEY)
    keys = jax.vmap(lambda s: jax.random.split(jax.random.fold_in(base, s)))(seeds)
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, schedule.num_train_steps, jnp.int32))(keys[:, 0])
    noise = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys[:, 1])
    return t, noise


def make_loss_evaluator(config, model, schedule, example_fn, batch_fn, condition) -> Evaluator:
    """`eval/<eval_split>/loss`: the mean diffusion loss over config.model.eval_max_batches
    batches of the eval split, each example at its own fixed timestep and noise (`noise_seed`)."""
    max_batches = int(config.model.eval_max_batches)

    @jax.jit
    def eval_step(params, batch):
        x0 = batch["target"]
        t, noise = eval_noise(batch["noise_seed"], x0.shape[1:], schedule)
        loss = per_example_loss(model, schedule, config, params, x0, t, noise, condition(batch))
        rows = batch["_mask"].astype(jnp.float32)
        return (loss * rows).sum(), rows.sum()

    def fn(params, step):
        del step
        total, count = 0.0, 0.0
        for b in eval_batches(config, params, example_fn, max_batches=max_batches, batch_fn=batch_fn):
            loss_sum, rows = jax.device_get(eval_step(params, b))
            total, count = total + float(loss_sum), count + float(rows)
        if not count:
            raise RuntimeError(f"diffusion evaluator: split {config.data.eval_split!r} gave no examples")
        return {"loss": total / count}

    return Evaluator(name=str(config.data.eval_split), fn=fn)
