"""CLIP's luma_chroma patch stem: a shapes-suite experiment, not part of the CLIP paper.

An RGB patch kernel sees an outline through colour-specific weights, so a shape learned in some
colours need not be recognised in another. This stem embeds each patch's luminance standardised
within the patch (the same for an outline in any colour, on any uniform background) and, as a
separate token term, its luminance-weighted mean colour (the colour of what is bright in the
patch, not how much of the patch it covers). The colour terms join the patch tokens before vision
block `model.chroma_layer` (0: at the stem), so the blocks before it are colour-blind.

It helps where objects are flat colours on black (the shapes suite's held-out colour-shape pairs)
and is not expected to help on photographs; no released weights use it. Selected by
`model.patch_embed='luma_chroma'` through `clip_jax.clip_models`. Measurements:
docs/results.md#clip-on-the-shapes-suite-budget-and-patch-stem-ablation-date-not-recorded.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax import model
from core_jax.errors import ConfigError
from core_jax.layers import param
from core_jax.modeling import constrain, dense, dtype_of

# CLIP's normalisation constants (to get pixels back in [0, 1]), BT.601 luminance weights, and the
# variance floor of a patch's luminance pattern (a uniform patch gives a zero pattern) and of the
# colour average's weight.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LUMA = (0.299, 0.587, 0.114)
LUMA_EPS = 1e-4
CHROMA_EPS = 1e-3


class LumaChromaVisionTower(model.VisionTower):
    """The paper's ViT with the luma_chroma stem; params `luma_kernel [p*p, width]` and
    `chroma_kernel [3, width]` replace `patch_kernel`, and with chroma_layer = k > 0 the blocks
    are split into `transformer` (k) and `transformer_late` (vision_layers - k)."""

    chroma_layer: int = 0

    @nn.compact
    def __call__(self, images):
        cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
        x, colour = self.luma_chroma_tokens(images, dtype)
        k = self.chroma_layer
        if k == 0:
            x = x + colour
        x = self.add_class_token(x, dtype)
        if k == 0:
            return self.project(self.blocks(cfg.vision_layers, dtype)(x), dtype)
        x = self.blocks(k, dtype)(x)
        x = x + jnp.pad(colour, ((0, 0), (1, 0), (0, 0)))  # the class token gets no colour
        x = self.blocks(cfg.vision_layers - k, dtype, name="transformer_late")(x)
        return self.project(x, dtype)

    def luma_chroma_tokens(self, images, dtype):
        """[B, S, S, 3] CLIP-normalised -> (pattern tokens, colour tokens), each [B, patches, width]."""
        g, p, width = self.patch_grid(images), self.cfg.patch_size, self.cfg.vision_width
        mean, std = jnp.asarray(CLIP_MEAN, dtype), jnp.asarray(CLIP_STD, dtype)
        rgb = model.split_patches(images.astype(dtype) * std + mean, g, p)  # pixels in [0, 1]
        luma = rgb @ jnp.asarray(LUMA, dtype)  # [b, n, p*p]
        centred = luma - luma.mean(-1, keepdims=True)
        pattern = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), -1, keepdims=True) + LUMA_EPS)
        weights = jnp.maximum(luma, 0.0)[..., None]
        colour = (weights * rgb).sum(-2) / (weights.sum(-2) + CHROMA_EPS * p * p)
        colour = (colour - mean) / std
        pattern = constrain(pattern, ("act_batch", "act_length", None))
        luma_kernel = param(
            self, "luma_kernel", nn.initializers.normal((p * p) ** -0.5), (p * p, width), ("patch", "embed")
        )
        chroma_kernel = param(
            self, "chroma_kernel", nn.initializers.normal(3**-0.5), (3, width), (None, "embed")
        )
        return dense(pattern, luma_kernel.astype(dtype)), dense(colour, chroma_kernel.astype(dtype))


class LumaChromaCLIP(model.CLIP):
    """The paper's CLIP with the luma_chroma vision tower; the text tower and the rest unchanged."""

    chroma_layer: int = 0

    def make_vision_tower(self) -> LumaChromaVisionTower:
        return LumaChromaVisionTower(self.cfg, chroma_layer=self.chroma_layer)


def make_clip(model_config, spec: model.CLIPSpec) -> LumaChromaCLIP:
    """`clip_jax.model.spec_from_config`'s spec -> the luma_chroma model, `model.chroma_layer` checked."""
    chroma_layer = int(model_config.get("chroma_layer", 0))
    if not 0 <= chroma_layer < spec.vision_layers:
        raise ConfigError(
            f"config.model.chroma_layer={chroma_layer}: needs 0 <= chroma_layer < "
            f"vision_layers={spec.vision_layers} (a block after the colour joins)"
        )
    return LumaChromaCLIP(spec, chroma_layer=chroma_layer)
