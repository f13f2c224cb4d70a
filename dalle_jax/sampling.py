"""Sampling image tokens from the DALL-E transformer: KV cache, guidance, top-k/top-p, and
completion / inpainting / variations as token-level operations.

`sample(...)` prefills BOS + text in one pass, then generates the image tokens one at a time inside
one jitted `lax.fori_loop`, each step feeding the previous token through the per-layer key/value
cache (every mask kind works: the mask row of the step's position is applied to the cache).
`sample_no_cache(...)` is the reference: the same loop, but each step recomputes the whole stream.

Known tokens (`prefix_image_tokens` + `known_mask`): positions where known_mask is True are not
sampled but teacher-forced (their given token goes through the cache like a sampled one). Sampling
runs in raster order, so with this causal model a generated token sees the known tokens *before*
it, never those after it: inpainting a rectangle conditions each new token on everything above it
and to its left (known or already generated), and the known tokens below/right of the rectangle are
kept verbatim but cannot influence it. That is the simple, documented behaviour; nothing re-ranks
or re-samples for consistency with the tokens that follow.

Classifier-free guidance (cond_scale s): one forward pass per step over 2B rows (the captions and
the all-pad caption), logits = uncond + s * (cond - uncond), computed as
cond + (s - 1) * (cond - uncond) so that s = 1 reproduces the conditional logits bit for bit.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.transformer import (
    MAX_UNROLLED_LAYERS,
    DalleConfig,
    DalleTransformer,
    init_params,
    input_stream,
    unconditional_text,
    unscan_params,
)

# The KV cache of one layer, [rows, heads, positions, head_dim], as core_jax.layers.Attention lays it out.
CACHE_AXES = ("act_batch", "act_heads", "act_length", "act_kv")


# ----------------------------------------------------------------------------- logits processing


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Sets logits outside the top-k and outside the top-p nucleus to -inf ([..., V] float).

    top_k=0 and top_p=1 disable each filter. The nucleus is the smallest set of most likely tokens
    whose probability reaches top_p (the most likely token is always kept)."""
    neg = jnp.asarray(-jnp.inf, logits.dtype)
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < top_p
        # threshold = the smallest kept logit; ties with it are kept too
        threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg, logits)
    return logits


def guided_logits(cond: jax.Array, uncond: jax.Array, scale) -> jax.Array:
    """uncond + s * (cond - uncond), written so that s = 1 gives exactly `cond`."""
    return cond + (scale - 1.0) * (cond - uncond)


# ----------------------------------------------------------------------------- the jitted loops


@functools.partial(jax.jit, static_argnames=("cfg", "top_k", "top_p", "greedy", "guided", "use_cache"))
def _sample_jit(
    params,
    text,
    rng,
    temperature,
    cond_scale,
    given,
    known,
    *,
    cfg: DalleConfig,
    top_k: int,
    top_p: float,
    greedy: bool,
    guided: bool,
    use_cache: bool,
):
    batch, lt, n = text.shape[0], cfg.text_len, cfg.num_image_tokens
    if guided:  # rows [0, B) conditional, [B, 2B) unconditional
        text = jnp.concatenate([text, unconditional_text(cfg, batch)], 0)

    def pick(i, logits):
        """Next token of every row from float32 logits [rows, V] predicting image token i."""
        if guided:
            logits = guided_logits(logits[:batch], logits[batch:], cond_scale)
        if greedy:
            tok = jnp.argmax(logits, axis=-1)
        else:
            logits = filter_logits(logits / temperature, top_k, top_p)
            tok = jax.random.categorical(jax.random.fold_in(rng, i), logits, axis=-1)
        return jnp.where(known[:, i], given[:, i], tok).astype(jnp.int32)

    def rows(tok):
        return jnp.concatenate([tok, tok], 0) if guided else tok

    tokens = jnp.zeros((batch, n), jnp.int32)
    if not use_cache:
        model = DalleTransformer(cfg)

        def recompute(i, tokens):
            logits = model.apply({"params": params}, input_stream(text, rows(tokens)), heads="image")
            return tokens.at[:, i].set(pick(i, jax.lax.dynamic_index_in_dim(logits, lt + i, 1, False)))

        return jax.lax.fori_loop(0, n, recompute, tokens)

    if cfg.scan_layers and cfg.num_layers <= MAX_UNROLLED_LAYERS:
        # Decoding through nn.scan keeps each layer's KV cache as scanned state, which the scan
        # slices and re-stacks every token: a copy of the whole cache (and of the weights) per
        # step, 3-7x slower on CPU. Unrolled, each layer's cache is its own buffer, updated in place
        # by the fori_loop; the static weight slices below run once per call, before the loop.
        params, cfg = unscan_params(params, cfg.num_layers), cfg.replace(scan_layers=False)
    model = DalleTransformer(cfg, decode=True)
    prefix = jnp.concatenate([jnp.zeros((text.shape[0], 1), jnp.int32), text], 1)  # BOS + text
    logits, variables = model.apply({"params": params}, prefix, 0, heads="image", mutable=["cache"])

    def step(i, carry):
        cache, logits, tokens = carry
        tok = pick(i, logits)
        out, variables = model.apply(
            {"params": params, "cache": cache},
            rows(tok)[:, None],
            lt + 1 + i,
            heads="image",
            mutable=["cache"],
        )
        return variables["cache"], out[:, 0], tokens.at[:, i].set(tok)

    carry = (variables["cache"], logits[:, -1], tokens)
    _, logits, tokens = jax.lax.fori_loop(0, n - 1, step, carry)  # the last token is never fed
    return tokens.at[:, n - 1].set(pick(n - 1, logits))


def decode_step(cfg: DalleConfig, rows: int):
    """(step, boxed abstract args): one KV-cache step of sampling, `step(params, cache, tokens,
    position) -> (cache, logits)`, for `rows` rows (guidance runs two per sample), with the params
    and the full-length cache as abstract trees whose leaves carry logical axis names. What
    core_jax.aot compiles to tell whether sampling fits a slice: the cache, not the params, grows
    with the batch. Deep models decode through the layer scan, as `sample` runs them."""
    if cfg.scan_layers and cfg.num_layers <= MAX_UNROLLED_LAYERS:
        cfg = cfg.replace(scan_layers=False)
    model = DalleTransformer(cfg, decode=True)
    boxed_params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    prefix = jax.ShapeDtypeStruct((rows, cfg.text_len + 1), jnp.int32)  # BOS + text

    def prefill(params, ids):
        return model.apply({"params": params}, ids, 0, heads="image", mutable=["cache"])[1]["cache"]

    cache = jax.eval_shape(prefill, nn.meta.unbox(boxed_params), prefix)
    # A scanned stack adds a leading layer axis to every cache leaf.
    boxed_cache = jax.tree.map(lambda c: nn.Partitioned(c, (None,) * (c.ndim - 4) + CACHE_AXES), cache)
    tokens = nn.Partitioned(jax.ShapeDtypeStruct((rows,), jnp.int32), ("act_batch",))
    position = jax.ShapeDtypeStruct((), jnp.int32)

    def step(params, cache, tokens, position):
        logits, variables = model.apply(
            {"params": params, "cache": cache}, tokens[:, None], position, heads="image", mutable=["cache"]
        )
        return variables["cache"], logits[:, 0]

    return step, (boxed_params, boxed_cache, tokens, position)


# ----------------------------------------------------------------------------- public API


def _as_config(model_config) -> DalleConfig:
    if isinstance(model_config, DalleConfig):
        return model_config
    if hasattr(model_config, "model"):
        return DalleConfig.from_config(model_config)
    raise TypeError(
        f"model_config must be a DalleConfig or a run config with .model, got {type(model_config).__name__}"
    )


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_range(name, x, upper):
    if _is_concrete(x) and x.size:
        lo, hi = int(jnp.min(x)), int(jnp.max(x))
        if lo < 0 or hi >= upper:
            raise ValueError(f"{name} must lie in [0, {upper}), got values in [{lo}, {hi}]")


def _per_row(name, x, batch, cfg, dtype):
    """[N], [g, g], [B, N] or [B, g, g] -> [B, N]."""
    n, g = cfg.num_image_tokens, cfg.image_grid
    x = jnp.asarray(x) if not isinstance(x, np.ndarray) else x
    shape = tuple(x.shape)
    if shape in ((n,), (g, g)):
        x = x.reshape(1, n)
        x = jnp.broadcast_to(x, (batch, n)) if isinstance(x, jax.Array) else np.broadcast_to(x, (batch, n))
    elif shape in ((batch, n), (batch, g, g)):
        x = x.reshape(batch, n)
    else:
        raise ValueError(
            f"{name} has shape {shape}; expected [{n}], [{g}, {g}], [{batch}, {n}] or "
            f"[{batch}, {g}, {g}] for a {g}x{g} image grid and batch {batch}"
        )
    return x.astype(dtype)


def _run(
    params,
    model_config,
    text_tokens,
    *,
    rng,
    temperature,
    top_k,
    top_p,
    cond_scale,
    prefix_image_tokens,
    known_mask,
    use_cache,
):
    cfg = _as_config(model_config)
    text = text_tokens if isinstance(text_tokens, jax.Array) else np.asarray(text_tokens)
    if text.ndim != 2 or text.shape[1] != cfg.text_len:
        raise ValueError(f"text_tokens must be int [batch, {cfg.text_len}], got shape {tuple(text.shape)}")
    if not jnp.issubdtype(text.dtype, jnp.integer):
        raise ValueError(f"text_tokens must be integers, got {text.dtype}")
    _check_range("text_tokens", text, cfg.total_text_vocab)
    batch = text.shape[0]
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 <= int(top_k) <= cfg.image_vocab_size:
        raise ValueError(f"top_k must be in [0, {cfg.image_vocab_size}] (0 = off), got {top_k}")
    if not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    if (prefix_image_tokens is None) != (known_mask is None):
        raise ValueError(
            "prefix_image_tokens and known_mask go together: the mask says which of the "
            "given tokens to keep (see completion_mask / rectangle_mask)"
        )
    if prefix_image_tokens is None:
        given = np.zeros((batch, cfg.num_image_tokens), np.int32)
        known = np.zeros((batch, cfg.num_image_tokens), bool)
    else:
        given = _per_row("prefix_image_tokens", prefix_image_tokens, batch, cfg, jnp.int32)
        _check_range("prefix_image_tokens", given, cfg.image_vocab_size)
        known = _per_row("known_mask", known_mask, batch, cfg, bool)
    return _sample_jit(
        params,
        text.astype(jnp.int32),
        rng,
        jnp.float32(max(temperature, 1e-6)),
        jnp.float32(1.0 if cond_scale is None else cond_scale),
        given,
        known,
        cfg=cfg,
        top_k=int(top_k),
        top_p=float(top_p),
        greedy=temperature == 0,
        guided=cond_scale is not None,
        use_cache=use_cache,
    )


def sample(
    params,
    model_config,
    text_tokens,
    *,
    rng,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    cond_scale=None,
    prefix_image_tokens=None,
    known_mask=None,
) -> jax.Array:
    """Image tokens int32 [B, n_image] (row-major grid) for text_tokens int [B, text_len].

    params: unboxed params (sharded or not; the batch is split like training when run under
      `jax.set_mesh`). model_config: a DalleConfig or the run config.
    temperature: 0 = greedy (argmax); top_k: 0 = off; top_p: 1 = off (applied after temperature).
    cond_scale: None = plain conditional sampling; a number s = classifier-free guidance over a
      2B-row batch (s = 1 gives the same tokens as None, at twice the cost).
    prefix_image_tokens [B, n] / [B, g, g] (or one [n] / [g, g] for all rows) with known_mask
      (bool, same layouts): True positions are kept as given and teacher-forced.
    Each row gets its own random stream, step i of every call uses fold_in(rng, i).
    """
    return _run(
        params,
        model_config,
        text_tokens,
        rng=rng,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        cond_scale=cond_scale,
        prefix_image_tokens=prefix_image_tokens,
        known_mask=known_mask,
        use_cache=True,
    )


def sample_no_cache(
    params,
    model_config,
    text_tokens,
    *,
    rng,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    cond_scale=None,
    prefix_image_tokens=None,
    known_mask=None,
) -> jax.Array:
    """`sample` recomputing the whole stream at every step (the reference; ~n times slower)."""
    return _run(
        params,
        model_config,
        text_tokens,
        rng=rng,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        cond_scale=cond_scale,
        prefix_image_tokens=prefix_image_tokens,
        known_mask=known_mask,
        use_cache=False,
    )


def completion_mask(grid: int, rows_kept: int) -> np.ndarray:
    """bool [grid*grid]: True on the first `rows_kept` rows (kept), False below (regenerated)."""
    if not 0 <= rows_kept <= grid:
        raise ValueError(f"rows_kept must be in [0, {grid}], got {rows_kept}")
    return np.repeat(np.arange(grid) < rows_kept, grid)


def rectangle_mask(grid: int, top: int, left: int, height: int, width: int) -> np.ndarray:
    """bool [grid*grid]: False inside the rectangle (regenerated), True outside (kept)."""
    if height <= 0 or width <= 0 or top < 0 or left < 0 or top + height > grid or left + width > grid:
        raise ValueError(
            f"rectangle top={top} left={left} height={height} width={width} does not "
            f"fit a {grid}x{grid} token grid"
        )
    inside = np.zeros((grid, grid), bool)
    inside[top : top + height, left : left + width] = True
    return ~inside.reshape(-1)


def complete(params, model_config, text_tokens, image_tokens, rows_kept: int, **kwargs):
    """Keeps the first `rows_kept` token rows of each image and regenerates the rest."""
    cfg = _as_config(model_config)
    return sample(
        params,
        cfg,
        text_tokens,
        prefix_image_tokens=image_tokens,
        known_mask=completion_mask(cfg.image_grid, rows_kept),
        **kwargs,
    )


def inpaint(params, model_config, text_tokens, image_tokens, box, **kwargs):
    """Regenerates the tokens inside box = (top, left, height, width) (token-grid units), in raster
    order, conditioned on the tokens before each one (see the module docstring)."""
    cfg = _as_config(model_config)
    return sample(
        params,
        cfg,
        text_tokens,
        prefix_image_tokens=image_tokens,
        known_mask=rectangle_mask(cfg.image_grid, *box),
        **kwargs,
    )


def variations(params, model_config, text_tokens, image_tokens, *, num: int, rows_kept: int, **kwargs):
    """`num` variations of each image: keep its first `rows_kept` rows, resample the rest with its
    caption. Returns [B * num, n_image], the variations of image b in rows b*num .. b*num+num-1."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    text = jnp.repeat(jnp.asarray(text_tokens), num, axis=0)
    images = jnp.repeat(jnp.asarray(image_tokens), num, axis=0)
    return complete(params, model_config, text, images, rows_kept, **kwargs)
