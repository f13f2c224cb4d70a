"""CLIP: a ViT image tower and a causal text transformer mapped into one embedding space.

Layouts follow OpenAI CLIP so that released weights convert without surgery (clip_jax/convert.py):
pre-LN residual blocks, a bias-free patch projection, features at the class token (images) and at
the end-of-text token (texts, the argmax of the token ids), bias-free output projections, and a
learnable temperature stored as a log.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from core_jax.errors import ConfigError

# quick_gelu / exact_gelu: CLIP's two activations (config.model.activation 'quick_gelu' / 'gelu').
from core_jax.layers import MLP, Attention, exact_gelu, flax_layer_norm, param, quick_gelu, sincos_2d  # noqa: F401
from core_jax.modeling import constrain, dense, dtype_of, layer_stack

# Temperatures above 100 make the softmax loss unstable; OpenAI clamps the learned scale there.
MAX_LOGIT_SCALE = math.log(100.0)
ACTIVATIONS = ("quick_gelu", "gelu")


class ResidualBlock(nn.Module):
    """Pre-LN transformer block (OpenAI's ResidualAttentionBlock)."""

    num_heads: int
    mlp_dim: int
    activation: str
    causal: bool
    ln_eps: float
    depth: int  # layers in the whole stack: residual-branch outputs start smaller in deep stacks
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        width = x.shape[-1]
        out_std = width**-0.5 * (2 * self.depth) ** -0.5
        h = flax_layer_norm(self.ln_eps, self.dtype, "ln_1")(x)
        x = x + Attention(
            num_heads=self.num_heads, out_std=out_std, causal=self.causal, dtype=self.dtype, name="attn"
        )(h)
        h = flax_layer_norm(self.ln_eps, self.dtype, "ln_2")(x)
        x = x + MLP(
            mlp_dim=self.mlp_dim,
            activation=self.activation,
            in_std=(2 * width) ** -0.5,
            out_std=out_std,
            dtype=self.dtype,
            name="mlp",
        )(h)
        return constrain(x, ("act_batch", "act_length", "act_embed"))


def _transformer(
    cfg,
    num_layers: int,
    num_heads: int,
    width: int,
    causal: bool,
    dtype,
    depth: int | None = None,
    name: str = "transformer",
):
    return layer_stack(
        ResidualBlock,
        num_layers,
        scan=cfg.scan_layers,
        remat=cfg.remat,
        unroll=cfg.scan_unroll,
        name=name,
        num_heads=num_heads,
        mlp_dim=int(width * cfg.mlp_ratio),
        activation=cfg.activation,
        causal=causal,
        ln_eps=cfg.ln_eps,
        depth=depth or num_layers,
        dtype=dtype,
    )


class VisionTower(nn.Module):
    """ViT: patches -> [class token; patches] + positions -> ln_pre -> blocks -> ln_post(class) -> proj.

    Experiments (clip_jax/experiments) subclass it and reuse its steps."""

    cfg: Any  # CLIPSpec

    @nn.compact
    def __call__(self, images):
        dtype = dtype_of(self.cfg.dtype)
        x = self.patch_tokens(images, dtype)
        x = self.add_class_token(x, dtype)
        x = self.blocks(self.cfg.vision_layers, dtype)(x)
        return self.project(x, dtype)

    def patch_grid(self, images) -> int:
        """Patches per side, once `images` is checked to be [B, image_size, image_size, 3]."""
        cfg = self.cfg
        if images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(
                f"encode_image: expected images [B, {cfg.image_size}, {cfg.image_size}, 3], "
                f"got {images.shape}"
            )
        return cfg.image_size // cfg.patch_size

    def patch_tokens(self, images, dtype):
        """[B, S, S, 3] -> [B, patches, width]: OpenAI's bias-free stride-p conv, written as one
        matmul over flattened (row, col, channel) patches."""
        g, p, width = self.patch_grid(images), self.cfg.patch_size, self.cfg.vision_width
        patches = split_patches(images, g, p).reshape(images.shape[0], g * g, p * p * 3)
        patches = constrain(patches.astype(dtype), ("act_batch", "act_length", None))
        patch_kernel = param(
            self,
            "patch_kernel",
            nn.initializers.normal((p * p * 3) ** -0.5),
            (p * p * 3, width),
            ("patch", "embed"),
        )
        return dense(patches, patch_kernel.astype(dtype))

    def add_class_token(self, x, dtype):
        """[B, patches, width] -> [class token; patches] + positions, through ln_pre."""
        b, n, width = x.shape
        class_embedding = param(
            self, "class_embedding", nn.initializers.normal(width**-0.5), (width,), ("norm",)
        )
        cls = jnp.broadcast_to(class_embedding.astype(dtype), (b, 1, width))
        x = jnp.concatenate([cls, x], axis=1)
        if self.cfg.posemb == "sincos2d":
            # Fixed, O(1) positions where the learned table starts at width**-0.5 beside patch
            # embeddings of O(1); the class token gets none.
            grid = self.cfg.image_size // self.cfg.patch_size
            positions = jnp.pad(sincos_2d(grid, grid, width), ((1, 0), (0, 0)))
        else:
            positions = param(
                self,
                "positional_embedding",
                nn.initializers.normal(width**-0.5),
                (n + 1, width),
                ("length", "embed"),
            )
        x = x + positions.astype(dtype)[None]
        return flax_layer_norm(self.cfg.ln_eps, dtype, "ln_pre")(x)

    def blocks(self, num_layers: int, dtype, name: str = "transformer"):
        """`num_layers` of the tower's residual blocks, initialised as parts of its full depth."""
        cfg = self.cfg
        return _transformer(
            cfg,
            num_layers,
            cfg.vision_heads,
            cfg.vision_width,
            False,
            dtype,
            depth=cfg.vision_layers,
            name=name,
        )

    def project(self, x, dtype):
        """The class token's state -> ln_post -> the embedding (float32)."""
        width = self.cfg.vision_width
        pooled = flax_layer_norm(self.cfg.ln_eps, dtype, "ln_post")(x[:, 0])
        proj = param(
            self, "proj", nn.initializers.normal(width**-0.5), (width, self.cfg.embed_dim), ("embed", None)
        )
        return (pooled @ proj.astype(dtype)).astype(jnp.float32)


def split_patches(images, g: int, p: int):
    """[B, g*p, g*p, C] -> [B, g*g, p*p, C]: row-major patches, each row-major over its pixels."""
    b, c = images.shape[0], images.shape[-1]
    return images.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p, c)


class TextTower(nn.Module):
    """Causal transformer over BPE ids; the feature is read at the end-of-text token (max id).

    `return_states=True` also returns the per-token states [B, L, text_width] (after ln_final,
    before the projection; float32), which the unCLIP decoder attends to."""

    cfg: Any

    @nn.compact
    def __call__(self, tokens, return_states: bool = False):
        cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
        if tokens.ndim != 2 or tokens.shape[1] > cfg.context_length:
            raise ValueError(
                f"encode_text: expected int tokens [B, L<={cfg.context_length}], got {tokens.shape}"
            )
        width = cfg.text_width
        embedding = param(
            self, "token_embedding", nn.initializers.normal(0.02), (cfg.vocab_size, width), ("vocab", "embed")
        )
        x = jnp.take(embedding.astype(dtype), tokens, axis=0)
        positions = param(
            self,
            "positional_embedding",
            nn.initializers.normal(0.01),
            (cfg.context_length, width),
            ("length", "embed"),
        )
        x = x + positions.astype(dtype)[None, : tokens.shape[1]]
        x = _transformer(cfg, cfg.text_layers, cfg.text_heads, width, True, dtype)(x)
        x = flax_layer_norm(cfg.ln_eps, dtype, "ln_final")(x)
        eot = jnp.argmax(tokens, axis=-1)
        pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        proj = param(
            self,
            "text_projection",
            nn.initializers.normal(width**-0.5),
            (width, cfg.embed_dim),
            ("embed", None),
        )
        features = (pooled @ proj.astype(dtype)).astype(jnp.float32)
        return (x.astype(jnp.float32), features) if return_states else features


def l2_normalize(x, eps: float = 1e-12):
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps))


class CLIP(nn.Module):
    cfg: Any  # CLIPSpec (hashable; build with spec_from_config)

    def setup(self):
        self.visual = self.make_vision_tower()
        self.text = TextTower(self.cfg)
        sigmoid = self.cfg.loss.startswith("sigmoid")
        scale_init = self.cfg.sigmoid_scale_init if sigmoid else self.cfg.logit_scale_init
        self.logit_scale = self.param(
            "logit_scale",
            nn.with_logical_partitioning(nn.initializers.constant(scale_init), ()),
            (),
            jnp.float32,
        )
        if sigmoid:
            self.logit_bias = self.param(
                "logit_bias",
                nn.with_logical_partitioning(nn.initializers.constant(self.cfg.sigmoid_bias_init), ()),
                (),
                jnp.float32,
            )

    def make_vision_tower(self) -> VisionTower:
        """The image tower; an experiment (clip_jax/experiments) swaps in its own."""
        return VisionTower(self.cfg)

    def encode_image(self, images, normalize: bool = True):
        features = self.visual(images)
        return l2_normalize(features) if normalize else features

    def encode_text(self, tokens, normalize: bool = True):
        features = self.text(tokens)
        return l2_normalize(features) if normalize else features

    def encode_text_tokens(self, tokens, normalize: bool = True):
        """(per-token states [B, L, text_width], text features [B, E]) from one pass of the tower."""
        states, features = self.text(tokens, return_states=True)
        return states, l2_normalize(features) if normalize else features

    def temperature(self):
        """exp(logit_scale) clamped at 100: the multiplier of cosine similarities."""
        return jnp.exp(jnp.minimum(self.logit_scale, MAX_LOGIT_SCALE))

    def bias(self):
        return self.logit_bias if self.cfg.loss.startswith("sigmoid") else jnp.zeros((), jnp.float32)

    def __call__(self, images, tokens):
        """L2-normalised image and text features, the clamped scale and (sigmoid losses) the bias."""
        return {
            "image": self.encode_image(images),
            "text": self.encode_text(tokens),
            "scale": self.temperature(),
            "bias": self.bias(),
        }


# ----------------------------------------------------------------------------------------------
# Building from a config and pure functions over params.

# The vision tower's patch positions: learn (OpenAI's learned table) | sincos2d (fixed,
# core_jax.layers.sincos_2d).
POSEMBS = ("learn", "sincos2d")
_SPEC_KEYS = (
    "image_size",
    "patch_size",
    "vision_width",
    "vision_layers",
    "vision_heads",
    "text_width",
    "text_layers",
    "text_heads",
    "embed_dim",
    "mlp_ratio",
    "activation",
    "ln_eps",
    "loss",
    "logit_scale_init",
    "sigmoid_scale_init",
    "sigmoid_bias_init",
)
LOSSES = ("softmax", "sigmoid", "sigmoid_chunked")


@dataclasses.dataclass(frozen=True)
class CLIPSpec:
    """The config fields the module needs, frozen (linen module fields must be hashable)."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    embed_dim: int
    mlp_ratio: float
    activation: str
    ln_eps: float
    loss: str
    logit_scale_init: float
    sigmoid_scale_init: float
    sigmoid_bias_init: float
    vocab_size: int
    context_length: int
    dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    scan_unroll: int = 1
    posemb: str = "learn"


def spec_from_config(config) -> CLIPSpec:
    """Checks `config.model` / `config.text` and returns the module's spec."""
    m = config.model
    for key in _SPEC_KEYS:
        if key not in m:
            raise ValueError(f"config.model.{key} is missing")
    if m.activation not in ACTIVATIONS:
        raise ValueError(f"config.model.activation must be one of {ACTIVATIONS}, got {m.activation!r}")
    if m.loss not in LOSSES:
        raise ValueError(f"config.model.loss must be one of {LOSSES}, got {m.loss!r}")
    if m.image_size % m.patch_size:
        raise ValueError(
            f"config.model.image_size={m.image_size} is not a multiple of patch_size={m.patch_size}"
        )
    for width, heads, tower in (
        (m.vision_width, m.vision_heads, "vision"),
        (m.text_width, m.text_heads, "text"),
    ):
        if width % heads:
            raise ValueError(f"config.model.{tower}_width={width} is not divisible by {tower}_heads={heads}")
    posemb = str(m.get("posemb", "learn"))
    if posemb not in POSEMBS:
        raise ValueError(f"config.model.posemb must be one of {POSEMBS}, got {posemb!r}")
    if posemb == "sincos2d" and m.vision_width % 4:
        raise ValueError(
            f"config.model.posemb='sincos2d' needs vision_width divisible by 4, got {m.vision_width}"
        )
    values = {k: m[k] for k in _SPEC_KEYS}
    values["mlp_ratio"] = float(values["mlp_ratio"])
    values["ln_eps"] = float(values["ln_eps"])
    return CLIPSpec(
        **values,
        vocab_size=int(config.text.vocab_size),
        context_length=int(config.text.context_length),
        dtype=str(config.compute_dtype),
        scan_layers=bool(config.scan_layers),
        remat=str(config.remat),
        scan_unroll=int(config.get("scan_unroll", 1)),
        posemb=posemb,
    )  # scan_unroll and posemb: absent in older workdirs' configs


def clip_from_config(config) -> CLIP:
    """The paper's CLIP with `config.model`'s sizes. A config that selects an experiment is built by
    clip_jax.clip_models.clip_from_config, which this module cannot import (it builds on this one)."""
    patch_embed = str(config.model.get("patch_embed", "rgb"))  # absent in older workdirs: "rgb"
    if patch_embed != "rgb":
        raise ConfigError(
            f"model.patch_embed={patch_embed!r} selects an experiment, which "
            f"clip_jax.clip_models.clip_from_config builds"
        )
    return CLIP(spec_from_config(config))


def init_params(model: CLIP, rng, batch_size: int = 1):
    """Boxed params (nn.Partitioned leaves carrying logical names)."""
    spec = model.cfg
    images = jnp.zeros((batch_size, spec.image_size, spec.image_size, 3), jnp.float32)
    tokens = jnp.zeros((batch_size, spec.context_length), jnp.int32)
    return model.init({"params": rng}, images, tokens)["params"]


def abstract_params(model: CLIP):
    """Shapes/dtypes of boxed params without allocating them."""
    return jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0))


def encode_image(model: CLIP, params, images, normalize: bool = True):
    """Image features [B, E] (L2-normalised unless normalize=False); pure, jit-able."""
    return model.apply({"params": params}, images, normalize, method=CLIP.encode_image)


def encode_text(model: CLIP, params, tokens, normalize: bool = True):
    """Text features [B, E] at the end-of-text token (L2-normalised unless normalize=False)."""
    return model.apply({"params": params}, tokens, normalize, method=CLIP.encode_text)


def encode_text_tokens(model: CLIP, params, tokens, normalize: bool = True):
    """(states [B, L, text_width] float32, features [B, E]): the text tower's per-token states after
    its final LayerNorm and before the projection, and the same features as `encode_text`. Positions
    after the end-of-text token hold states too; `text_token_mask` says which to read."""
    return model.apply({"params": params}, tokens, normalize, method=CLIP.encode_text_tokens)


def text_token_mask(tokens):
    """bool [B, L]: the positions up to and including the end-of-text token (the argmax id; padding
    follows it with id 0), i.e. the states a caption's reader should attend to."""
    tokens = jnp.asarray(tokens)
    return jnp.arange(tokens.shape[1])[None] <= jnp.argmax(tokens, axis=-1)[:, None]


def logit_scale(model: CLIP, params):
    """The clamped temperature exp(min(logit_scale, ln 100))."""
    return model.apply({"params": params}, method=CLIP.temperature)


def train_flops_per_example(spec: CLIPSpec) -> float:
    """Forward+backward matmul FLOPs for one image-text pair (3x forward; attention included)."""

    def tower(tokens, width, layers, mlp_ratio):
        dense = 2 * tokens * (4 * width * width + 2 * width * int(width * mlp_ratio))
        attention = 2 * 2 * tokens * tokens * width
        return layers * (dense + attention)

    g = spec.image_size // spec.patch_size
    vision = tower(g * g + 1, spec.vision_width, spec.vision_layers, spec.mlp_ratio)
    vision += 2 * g * g * spec.patch_size**2 * 3 * spec.vision_width + 2 * spec.vision_width * spec.embed_dim
    text = tower(spec.context_length, spec.text_width, spec.text_layers, spec.mlp_ratio)
    text += 2 * spec.text_width * spec.embed_dim
    return 3.0 * (vision + text)
