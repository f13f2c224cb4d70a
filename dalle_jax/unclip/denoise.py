"""The trained decoder and upsampler as the samplers see them: conditioning, the null condition
of guidance, sampling and DDIM inversion. Pure JAX; the task previews and dalle_jax.unclip.api jit
them with `sampler`, `steps`, `cond_scale`, `eta` and `prediction` static.

A decoder condition is a dict of [N, ...] arrays: `clip_embedding` [N, E] (L2-normalised CLIP
image embeddings), `text_states` [N, L, W] and `text_mask` bool [N, L] (the caption's CLIP token
states and the positions to read). Its null condition, what guidance extrapolates away from, is
what training fed for a dropped embedding and a dropped caption (unCLIP section 2.1): a zero
embedding and an all-masked caption.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dalle_jax.unclip import samplers
from dalle_jax.unclip.schedule import Schedule

# Sampled images are clipped to the pixel range at every step (samplers.sample, clip_x0).
PIXEL_RANGE = (-1.0, 1.0)


def decoder_model_fn(model, params):
    """(x, t, condition) -> the network's output, for guided_denoise_fn."""

    def model_fn(x, t, cond):
        return model.apply(
            {"params": params},
            x,
            t,
            clip_embedding=cond["clip_embedding"],
            text_states=cond["text_states"],
            text_mask=cond["text_mask"],
        )

    return model_fn


def null_condition(cond: dict) -> dict:
    """The "no embedding, no caption" condition, one row that guided_denoise_fn broadcasts."""
    return {
        "clip_embedding": jnp.zeros((1,) + cond["clip_embedding"].shape[1:], cond["clip_embedding"].dtype),
        "text_states": jnp.zeros((1,) + cond["text_states"].shape[1:], cond["text_states"].dtype),
        "text_mask": jnp.zeros((1,) + cond["text_mask"].shape[1:], bool),
    }


def decoder_denoise_fn(model, params, cond: dict, cond_scale: float):
    """The decoder with classifier-free guidance at `cond_scale` (both rows in one batched pass;
    at 1 only the conditional rows run, so the output is the unguided model's bit for bit)."""
    return samplers.guided_denoise_fn(decoder_model_fn(model, params), cond, null_condition(cond), cond_scale)


def sample_decoder(
    model,
    schedule: Schedule,
    params,
    cond: dict,
    x_T,
    rng,
    *,
    sampler: str,
    steps: int,
    cond_scale: float,
    eta: float = 0.0,
    prediction: str = "eps",
    known=None,
):
    """Images in [-1, 1], [N, S, S, 3], decoded from x_T (noise, or a DDIM-inverted start) under
    `cond`; `known=(x0_known, mask)` keeps a region (samplers.sample)."""
    return samplers.sample(
        decoder_denoise_fn(model, params, cond, cond_scale),
        x_T,
        rng,
        schedule,
        sampler=sampler,
        steps=steps,
        prediction=prediction,
        eta=eta,
        clip_x0=PIXEL_RANGE,
        known=known,
    )


def invert_decoder(model, schedule: Schedule, params, cond: dict, x0, *, steps: int, prediction: str = "eps"):
    """The start noise from which DDIM (eta 0, `steps`) decodes x0 under `cond`, unguided: the
    x_T of unCLIP's bipartite latent (z_i, x_T) for variations (section 3.1)."""
    return samplers.ddim_invert(
        decoder_denoise_fn(model, params, cond, 1.0), x0, schedule, steps=steps, prediction=prediction
    )


def sample_upsampler(
    model,
    schedule: Schedule,
    params,
    low_res,
    x_T,
    rng,
    *,
    sampler: str,
    steps: int,
    eta: float = 0.0,
    prediction: str = "eps",
):
    """Images in [-1, 1] at x_T's size from low-resolution images in [-1, 1]. No guidance: the
    paper's upsamplers are unconditional ADMNets apart from the low-res input (section 2.1)."""

    def denoise(x, t):
        return model.apply({"params": params}, x, t, low_res=low_res)

    return samplers.sample(
        denoise,
        x_T,
        rng,
        schedule,
        sampler=sampler,
        steps=steps,
        prediction=prediction,
        eta=eta,
        clip_x0=PIXEL_RANGE,
    )


def start_noise(rng, shape) -> jax.Array:
    """Standard normal float32 noise, the sampler's start."""
    return jax.random.normal(rng, shape, jnp.float32)
