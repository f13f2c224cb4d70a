"""Sampling the diffusion prior: the caption prefix's KV cache, classifier-free guidance, best-of-n.

Pure JAX; the task's evaluator and dalle_jax.unclip.api jit `sample_prior` with `sampler`,
`steps`, `cond_scale`, `eta`, `prediction` and `use_cache` static.

A prior condition is a dict of [N, ...] arrays: `text_states` [N, L, W] and `text_mask` bool
[N, L] (the caption's CLIP token states and the tokens to read) and `text_embedding` [N, E] (the
caption's CLIP text embedding, standardised with the run's statistics). Its null condition, what
guidance extrapolates away from, is what training fed a dropped caption (section 2.2): every
caption token hidden and the learned null token in the text embedding's place.

With the cache (the default), each sampling call runs the caption prefix once for the N rows and
once for the one null row, and every step runs only the last three positions of the 2N guided
rows (N at cond_scale 1) against it. The cache enters `guided_denoise_fn` as part of the
condition, so guidance pairs each row's cache with the null row's in one batched pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dalle_jax.unclip import samplers
from dalle_jax.unclip.prior import PriorTransformer
from dalle_jax.unclip.schedule import Schedule

CONDITION_KEYS = ("text_states", "text_mask", "text_embedding")


def null_condition(cond: dict) -> dict:
    """The dropped-caption condition, one row (broadcast by guided_denoise_fn)."""
    null = {key: jnp.zeros((1,) + cond[key].shape[1:], cond[key].dtype) for key in CONDITION_KEYS}
    return dict(null, caption_kept=jnp.zeros((1,), jnp.float32))


def _batch_first(tree, scanned: bool):
    """Cache leaves [layers, B, ...] (scanned layers) <-> [B, layers, ...], so every leaf of a
    condition leads with the batch, as guided_denoise_fn wants."""
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), tree) if scanned else tree


def cached_prefix(model: PriorTransformer, params, cond: dict) -> dict:
    """{'cache': the prefix's keys and values (batch-first leaves), 'key_mask' [N, L + 4]}."""
    decoder = PriorTransformer(model.spec, decode=True)
    key_mask, variables = decoder.apply(
        {"params": params},
        cond["text_states"],
        cond["text_mask"],
        cond["text_embedding"],
        cond.get("caption_kept"),
        method="prefix",
        mutable=["cache"],
    )
    return {"cache": _batch_first(variables["cache"], model.spec.scan_layers), "key_mask": key_mask}


def cached_model_fn(model: PriorTransformer, params):
    """(x, t, cached prefix) -> the x0 prediction, running the last three positions only."""
    decoder = PriorTransformer(model.spec, decode=True)

    def model_fn(x, t, prefix):
        cache = _batch_first(prefix["cache"], model.spec.scan_layers)
        out, _ = decoder.apply(
            {"params": params, "cache": cache}, x, t, prefix["key_mask"], method="suffix", mutable=["cache"]
        )
        return out

    return model_fn


def full_model_fn(model: PriorTransformer, params):
    """(x, t, condition) -> the x0 prediction, recomputing the whole sequence (the reference)."""

    def model_fn(x, t, cond):
        return model.apply({"params": params}, x, t, **cond)

    return model_fn


def prior_denoise_fn(model: PriorTransformer, params, cond: dict, cond_scale: float, use_cache: bool = True):
    """The prior with classifier-free guidance at `cond_scale` (both rows in one batched pass; at
    1 only the conditional rows run, so the output is the unguided model's bit for bit)."""
    cond = {key: cond[key] for key in CONDITION_KEYS}
    cond["caption_kept"] = jnp.ones((cond["text_embedding"].shape[0],), jnp.float32)
    null = null_condition(cond)
    if use_cache:
        # The null prefix is needed only when guiding; at scale 1 guided_denoise_fn never reads it.
        null_prefix = cached_prefix(model, params, null) if float(cond_scale) != 1.0 else None
        return samplers.guided_denoise_fn(
            cached_model_fn(model, params), cached_prefix(model, params, cond), null_prefix, cond_scale
        )
    return samplers.guided_denoise_fn(full_model_fn(model, params), cond, null, cond_scale)


def sample_prior(
    model: PriorTransformer,
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
    prediction: str = "x0",
    use_cache: bool = True,
):
    """Standardised image embeddings [N, E] drawn from x_T [N, E] under `cond` (no clipping:
    embeddings have no fixed range)."""
    return samplers.sample(
        prior_denoise_fn(model, params, cond, cond_scale, use_cache),
        x_T,
        rng,
        schedule,
        sampler=sampler,
        steps=steps,
        prediction=prediction,
        eta=eta,
    )


def l2_normalize(x, eps: float = 1e-12):
    return x / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps))


def best_by_text(candidates, text_embeddings):
    """unCLIP section 2.2: of candidate image embeddings [N, n, E] per caption, the one with the
    largest dot product with the caption's text embedding [N, E]; returns ([N, E], index [N])."""
    scores = jnp.einsum("nke,ne->nk", candidates, text_embeddings)
    best = jnp.argmax(scores, axis=1)
    return jnp.take_along_axis(candidates, best[:, None, None], axis=1)[:, 0], best
