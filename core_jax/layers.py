"""Transformer layers every model composes: the param helper, 2-D positions, activations, LayerNorms,
attention, MLP.

Each model keeps its own parameter names, initial scales, norm flavour and rounding (released
weights and checkpoints depend on them), so these take those as fields instead of choosing them:
CLIP (clip_jax/model.py) builds q/k/v attention with flax's LayerNorm, the DALL-E transformer
(dalle_jax/transformer.py) query/key/value attention with a KV cache and per-layer masks and the
float32-statistics LayerNorm. A model's block wires them (pre-LN residuals) under its own names.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from core_jax.modeling import constrain, dense

# A finite fill for masked logits: exp(NEG_INF - max) is exactly 0 like with -inf, and a fully
# masked row (which no model here produces) would stay finite.
NEG_INF = -1e30
HEADS = ("act_batch", "act_length", "act_heads", "act_kv")


def param(module: nn.Module, name: str, init, shape, axes) -> jax.Array:
    """A float32 param carrying logical axis names (sharding rules map them to mesh axes)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def normal(std: float):
    return nn.initializers.normal(stddev=std)


def sincos_2d(grid_h: int, grid_w: int, width: int, temperature: float = 10_000.0) -> jax.Array:
    """float32 [grid_h * grid_w, width]: fixed 2-D sine-cosine positions of a row-major patch grid,
    a quarter of the channels each for sin / cos of the column, then of the row, at frequencies
    1 .. 1/temperature (MoCo v3, Chen et al. 2021; MAE; "Better plain ViT baselines", Beyer et al.
    2022). Entries lie in [-1, 1], as large as a patch embedding. width must be a multiple of 4."""
    if width % 4:
        raise ValueError(f"sincos_2d: width must be a multiple of 4, got {width}")
    omega = 1.0 / temperature ** (jnp.arange(width // 4) / (width // 4))
    rows, cols = jnp.meshgrid(jnp.arange(grid_h), jnp.arange(grid_w), indexing="ij")
    angles_x = cols.reshape(-1, 1) * omega[None]
    angles_y = rows.reshape(-1, 1) * omega[None]
    table = [jnp.sin(angles_x), jnp.cos(angles_x), jnp.sin(angles_y), jnp.cos(angles_y)]
    return jnp.concatenate(table, axis=1).astype(jnp.float32)


def quick_gelu(x):
    """OpenAI's sigmoid approximation of GELU; its CLIP weights were trained with it."""
    return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x):
    """The erf GELU (torch's nn.GELU, open_clip); flax's nn.gelu defaults to the tanh approximation."""
    return nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable] = {"quick_gelu": quick_gelu, "gelu": exact_gelu, "gelu_tanh": nn.gelu}


def flax_layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
    """flax's LayerNorm (params scale/bias, float32) with logical names: CLIP's, OpenAI's layout."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
    )


class LayerNorm(nn.Module):
    """LayerNorm with float32 statistics whatever the compute dtype and a two-pass variance (the
    DALL-E transformer's; its rounding differs from flax's one-pass LayerNorm)."""

    dtype: Any = jnp.float32
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",))
        bias = param(self, "bias", nn.initializers.zeros, (x.shape[-1],), ("norm",))
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with [embed, heads, kv] kernels (shardable by logical name).

    `__call__(x [B, S, D], mask=None, start=0)`. `mask` is a bool [T, T] over the positions of the
    whole sequence (query rows, key columns); the call uses the rows of its S positions. `causal`
    adds the lower triangle. With `cache_length` T > 0 the keys and values of the S positions are
    written at `start` into a 'cache' collection ([B, heads, T, head_dim]: the layout the attention
    dots want, so a step transposes only its own S new rows) and the queries attend over all of it;
    prefill (start 0) and one-token steps are the same code. Without a cache the call covers
    positions 0 .. S-1.

    `key_mask` bool [B, K] (optional; not with a context) hides keys per example, e.g. padding:
    K = cache_length with a cache, else S. Every query row must keep at least one key (a fully
    masked row would average every value); a causal sequence whose first position is always
    visible guarantees that.

    `context` [B, C, D_ctx] (optional; not with a cache): extra keys and values every query attends
    to besides the S positions (GLIDE's encoder_kv, Nichol et al. 2021 section 4.1), from their
    own projections `context_{k}_kernel [D_ctx, heads, kv]` and `context_{v}_kernel` (k, v: the
    second and third of `names`), created only when a context is passed, so a model that never
    passes one keeps its param tree and outputs. `context_mask` bool [B, C] hides context tokens
    (False); the S positions stay attendable, so a fully masked context is a valid input.
    """

    num_heads: int
    out_std: float  # the output kernel's
    causal: bool = False
    in_std: float | None = None  # q/k/v kernels; None: width ** -0.5
    head_dim: int | None = None  # None: width // num_heads
    names: tuple[str, str, str] = ("q", "k", "v")  # the q/k/v projections' param prefixes
    # How the q.k logits are rounded, each model as it was trained: False (CLIP): the dot in the
    # compute dtype, cast to float32, times head_dim ** -0.5; True (DALL-E): the dot accumulated
    # into float32, divided by sqrt(head_dim). Same maths, outputs differing in the last bits.
    float32_logits: bool = False
    cache_length: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, start=0, context=None, context_mask=None, key_mask=None):
        width, length = x.shape[-1], x.shape[1]
        if self.head_dim is None and width % self.num_heads:
            raise ValueError(f"attention: width {width} is not divisible by {self.num_heads} heads")
        h, k, dtype = self.num_heads, self.head_dim or width // self.num_heads, self.dtype
        in_init = normal(width**-0.5 if self.in_std is None else self.in_std)

        def project(name, source, init):
            kernel = param(self, f"{name}_kernel", init, (source.shape[-1], h, k), ("embed", "heads", "kv"))
            bias = param(self, f"{name}_bias", nn.initializers.zeros, (h, k), ("heads", "kv"))
            return constrain(dense(source, kernel.astype(dtype)) + bias.astype(dtype), HEADS)

        q, key, value = (project(name, x, in_init) for name in self.names)
        key_spec = "bthk"
        if self.cache_length:
            cache_names = ("act_batch", "act_heads", "act_length", "act_kv")
            shape = (x.shape[0], h, self.cache_length, k)
            cached_key = self.variable("cache", "key", jnp.zeros, shape, dtype)
            cached_value = self.variable("cache", "value", jnp.zeros, shape, dtype)

            def write(cache, new):
                new = new.astype(dtype).transpose(0, 2, 1, 3)
                return constrain(
                    jax.lax.dynamic_update_slice(cache.value, new, (0, 0, start, 0)), cache_names
                )

            cached_key.value = write(cached_key, key)
            cached_value.value = write(cached_value, value)
            key_spec, key, value = "bhtk", cached_key.value, cached_value.value
            if mask is not None:
                mask = jax.lax.dynamic_slice(mask, (start, 0), (length, self.cache_length))
            if self.causal:
                rows = start + jnp.arange(length)
                tril = rows[:, None] >= jnp.arange(self.cache_length)[None]
                mask = tril if mask is None else mask & tril
        else:
            if mask is not None:
                mask = mask[:length, :length]
            if self.causal:
                tril = jnp.tril(jnp.ones((length, length), bool))
                mask = tril if mask is None else mask & tril
        if key_mask is not None:
            if context is not None:
                raise ValueError("attention: key_mask cannot be combined with a context (use context_mask)")
            keys = self.cache_length or length
            if key_mask.shape != (x.shape[0], keys):
                raise ValueError(
                    f"attention: key_mask must be bool [{x.shape[0]}, {keys}], got {key_mask.shape}"
                )
            own = jnp.ones((length, keys), bool) if mask is None else mask
            mask = own[None, None] & key_mask.astype(bool)[:, None, None, :]
        if context is not None:
            if self.cache_length:
                raise ValueError("attention: a context cannot be combined with a KV cache")
            context = context.astype(dtype)
            context_init = normal(context.shape[-1] ** -0.5 if self.in_std is None else self.in_std)
            context_key, context_value = (
                project(f"context_{name}", context, context_init) for name in self.names[1:]
            )
            key = jnp.concatenate([key, context_key], axis=1)
            value = jnp.concatenate([value, context_value], axis=1)
            mask = _with_context_mask(mask, context_mask, x.shape[0], length, context.shape[1])

        if self.float32_logits:
            logits = jnp.einsum(
                f"bqhk,{key_spec}->bhqt", q, key, preferred_element_type=jnp.float32
            ) / math.sqrt(k)
        else:
            logits = jnp.einsum(f"bqhk,{key_spec}->bhqt", q, key).astype(jnp.float32) * k**-0.5
        if mask is not None:  # [q, t] shared by the batch, or [B, 1, q, t] with a context or key_mask
            logits = jnp.where(mask if mask.ndim == 4 else mask[None, None], logits, NEG_INF)
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
        out = constrain(jnp.einsum(f"bhqt,{key_spec}->bqhk", probs, value), HEADS)
        out_kernel = param(self, "out_kernel", normal(self.out_std), (h, k, width), ("heads", "kv", "embed"))
        out_bias = param(self, "out_bias", nn.initializers.zeros, (width,), ("norm",))
        return dense(out, out_kernel.astype(dtype), in_dims=2) + out_bias.astype(dtype)


def _with_context_mask(mask, context_mask, batch: int, length: int, context_length: int):
    """The [B, 1, S, S + C] key mask of S positions followed by C context tokens, or None when
    nothing is hidden: the positions' own [S, S] mask (None: all visible) beside each example's
    context mask (None: all visible), the same for every query."""
    if mask is None and context_mask is None:
        return None
    own = jnp.ones((length, length), bool) if mask is None else mask
    own = jnp.broadcast_to(own[None, None], (batch, 1, length, length))
    if context_mask is None:
        context_mask = jnp.ones((batch, context_length), bool)
    if context_mask.shape != (batch, context_length):
        raise ValueError(
            f"attention: context_mask must be bool [{batch}, {context_length}], got {context_mask.shape}"
        )
    extra = jnp.broadcast_to(context_mask.astype(bool)[:, None, None, :], (batch, 1, length, context_length))
    return jnp.concatenate([own, extra], axis=-1)


class MLP(nn.Module):
    """width -> mlp_dim -> activation -> width; `names` are the two layers' param prefixes."""

    mlp_dim: int
    activation: str  # a key of ACTIVATIONS
    in_std: float
    out_std: float
    names: tuple[str, str] = ("fc", "proj")
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        width, dtype = x.shape[-1], self.dtype
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"mlp: unknown activation {self.activation!r}; choose one of {tuple(ACTIVATIONS)}"
            )
        fc, proj = self.names
        in_kernel = param(self, f"{fc}_kernel", normal(self.in_std), (width, self.mlp_dim), ("embed", "mlp"))
        in_bias = param(self, f"{fc}_bias", nn.initializers.zeros, (self.mlp_dim,), ("mlp",))
        out_kernel = param(
            self, f"{proj}_kernel", normal(self.out_std), (self.mlp_dim, width), ("mlp", "embed")
        )
        out_bias = param(self, f"{proj}_bias", nn.initializers.zeros, (width,), ("norm",))
        h = ACTIVATIONS[self.activation](dense(x, in_kernel.astype(dtype)) + in_bias.astype(dtype))
        h = constrain(h, ("act_batch", "act_length", "act_mlp"))
        return dense(h, out_kernel.astype(dtype)) + out_bias.astype(dtype)
