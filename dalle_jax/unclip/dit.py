"""A diffusion transformer (DiT; Peebles & Xie 2023, arXiv 2212.09748) as an alternative unCLIP
decoder network, with the U-Net's call signature and conditioning.

`DiT(spec)(x, t, clip_embedding, text_states, text_mask, low_res)` predicts what the U-Net
predicts. The image is cut into p x p patches, each a token with a fixed 2-D sine-cosine position
(DiT section 3.1, "Patchify"); blocks are DiT's adaLN-Zero blocks (section 3.1: the LayerNorms'
shift and scale, and a gate on each residual branch, regressed from the conditioning vector and
initialised so every block starts as the identity). unCLIP's conditioning (Ramesh et al. 2022,
section 2.1) maps onto it as on the U-Net: the CLIP embedding is added to the timestep embedding
(the vector adaLN reads) and projected into `clip_tokens` context tokens, which with the caption's
token states every attention block also attends to (GLIDE's encoder_kv). Attention and MLP are the
shared core_jax.layers ones.

Why it exists: every token carries its position explicitly, where a U-Net has to infer position
from its convolutions' zero padding; where objects go is what a decoder must read from a global
embedding (docs/results.md measures both networks per CPU minute on the shapes suite).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from core_jax.errors import ConfigError
from core_jax.layers import MLP, Attention, sincos_2d
from core_jax.modeling import REMAT_POLICIES, constrain, dtype_of, remat_policy
from dalle_jax.unclip.unet import TOKENS, conditioning, linear, timestep_embedding, with_low_res
from dalle_jax.unclip.unet_spec import DTYPES

# DiT's LayerNorms carry no affine params of their own (adaLN supplies shift and scale); eps as DiT.
NORM_EPS = 1e-6
# DiT's timestep embedding: 256 sinusoidal frequencies, then an MLP to the width (section 3.1).
TIME_FREQUENCIES = 256


@dataclasses.dataclass(frozen=True)
class DiTSpec:
    """A DiT decoder's sizes and conditioning (0 switches a conditioning off), frozen for linen."""

    image_size: int  # the training resolution (any multiple of patch_size runs)
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    image_channels: int = 3
    low_res_channels: int = 0
    clip_dim: int = 0
    clip_tokens: int = 4
    text_width: int = 0
    dtype: str = "float32"
    remat: str = "none"

    @property
    def dropout(self) -> float:
        """DiT trains without dropout (Peebles & Xie 2023, section 3.1 has none)."""
        return 0.0

    @property
    def min_size(self) -> int:
        """The smallest input side the network takes (params do not depend on the size)."""
        return self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * (self.image_channels + self.low_res_channels)

    def context_length(self, text_length: int) -> int:
        return (self.clip_tokens if self.clip_dim else 0) + (text_length if self.text_width else 0)


def check_dit_spec(spec: DiTSpec) -> DiTSpec:
    """The spec if it builds, else a ConfigError naming the first field that does not."""
    if min(spec.patch_size, spec.width, spec.depth, spec.num_heads, spec.image_channels) <= 0:
        raise ConfigError("dit: patch_size, width, depth, num_heads and image_channels must be positive")
    if spec.image_size % spec.patch_size:
        raise ConfigError(f"dit: patch_size={spec.patch_size} must divide image_size={spec.image_size}")
    if spec.width % spec.num_heads or (spec.width // spec.num_heads) % 2:
        raise ConfigError(f"dit: num_heads={spec.num_heads} must divide width={spec.width} into even heads")
    if spec.width % 4:
        raise ConfigError(f"dit: width={spec.width} must be a multiple of 4 (2-D sine-cosine positions)")
    if spec.mlp_ratio <= 0:
        raise ConfigError(f"dit: mlp_ratio must be positive, got {spec.mlp_ratio}")
    if min(spec.low_res_channels, spec.clip_dim, spec.text_width, spec.clip_tokens) < 0:
        raise ConfigError("dit: low_res_channels, clip_dim, clip_tokens and text_width must be >= 0")
    if spec.dtype not in DTYPES:
        raise ConfigError(f"dit: dtype must be one of {DTYPES}, got {spec.dtype!r}")
    if spec.remat not in REMAT_POLICIES:
        raise ConfigError(f"dit: remat must be one of {REMAT_POLICIES}, got {spec.remat!r}")
    return spec


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def plain_norm(dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=NORM_EPS, use_bias=False, use_scale=False, dtype=dtype, name=name)


class DiTBlock(nn.Module):
    """adaLN-Zero: x + gate * attention(modulated norm), then x + gate * MLP(modulated norm)."""

    num_heads: int
    mlp_dim: int
    dtype: str

    @nn.compact
    def __call__(self, x, cond, context=None, context_mask=None):
        dtype, width = dtype_of(self.dtype), x.shape[-1]
        # Zero-initialised: every shift, scale and gate starts at 0, so the block is the identity.
        mod = linear(self, "ada", nn.silu(cond), 6 * width, ("embed", "mlp"), dtype, zero=True)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
        std = width**-0.5
        h = modulate(plain_norm(dtype, "norm_attn")(x), shift_a, scale_a)
        h = Attention(self.num_heads, out_std=std, dtype=dtype, name="attn")(
            constrain(h, TOKENS), context=context, context_mask=context_mask
        )
        x = x + gate_a[:, None] * h
        h = modulate(plain_norm(dtype, "norm_mlp")(x), shift_m, scale_m)
        h = MLP(self.mlp_dim, "gelu_tanh", in_std=std, out_std=self.mlp_dim**-0.5, dtype=dtype, name="mlp")(h)
        return constrain(x + gate_m[:, None] * h, TOKENS)


class DiT(nn.Module):
    """The diffusion transformer; see the module docstring. Output float32 [B, H, W, image_channels]."""

    spec: DiTSpec

    @nn.compact
    def __call__(
        self,
        x,
        t,
        clip_embedding=None,
        text_states=None,
        text_mask=None,
        low_res=None,
        deterministic: bool = True,
    ):
        """The U-Net's signature (dalle_jax/unclip/unet.py); `deterministic` is accepted for it
        (DiT has no dropout)."""
        spec, dtype = self.spec, dtype_of(self.spec.dtype)
        b, height, width_px, _ = x.shape
        p, d = spec.patch_size, spec.width
        if x.ndim != 4 or height % p or width_px % p or x.shape[-1] != spec.image_channels:
            raise ValueError(
                f"dit: x must be [B, H, W, {spec.image_channels}] with H, W multiples of {p}, got {x.shape}"
            )
        if jnp.shape(t) != (b,):
            raise ValueError(f"dit: t must be [{b}], got {jnp.shape(t)}")

        cond = timestep_embedding(t, TIME_FREQUENCIES)
        cond = linear(self, "time_fc", cond, d, ("embed", "mlp"), dtype)
        cond = linear(self, "time_proj", nn.silu(cond), d, ("mlp", "embed"), dtype)
        if spec.clip_dim and (clip_embedding is None or clip_embedding.shape != (b, spec.clip_dim)):
            got = None if clip_embedding is None else clip_embedding.shape
            raise ValueError(f"dit: clip_embedding must be [{b}, {spec.clip_dim}], got {got}")
        if spec.text_width and (
            text_states is None or text_states.ndim != 3 or text_states.shape[::2] != (b, spec.text_width)
        ):
            got = None if text_states is None else text_states.shape
            raise ValueError(f"dit: text_states must be [{b}, L, {spec.text_width}], got {got}")
        cond, context, context_mask = conditioning(
            self, spec, cond, clip_embedding, text_states, text_mask, d, dtype, clip_tokens=True
        )

        if spec.low_res_channels:
            if low_res is None or low_res.ndim != 4 or low_res.shape[::3] != (b, spec.low_res_channels):
                got = None if low_res is None else low_res.shape
                raise ValueError(f"dit: low_res must be [{b}, h, w, {spec.low_res_channels}], got {got}")
            x = with_low_res(x, low_res)
        gh, gw = height // p, width_px // p
        patches = x.reshape(b, gh, p, gw, p, -1).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, -1)
        h = linear(self, "patch_embed", patches, d, ("mlp", "embed"), dtype)
        h = constrain(h + sincos_2d(gh, gw, d).astype(dtype), TOKENS)

        block = DiTBlock
        if spec.remat != "none":
            block = nn.remat(DiTBlock, policy=remat_policy(spec.remat), prevent_cse=True)
        mlp_dim = int(round(d * spec.mlp_ratio))
        for i in range(spec.depth):
            h = block(spec.num_heads, mlp_dim, spec.dtype, name=f"block_{i}")(h, cond, context, context_mask)

        shift, scale = jnp.split(
            linear(self, "final_ada", nn.silu(cond), 2 * d, ("embed", "mlp"), dtype, zero=True), 2, -1
        )
        h = modulate(plain_norm(dtype, "final_norm")(h), shift, scale)
        c = spec.image_channels
        out = linear(self, "final_proj", h, p * p * c, ("embed", "mlp"), dtype, zero=True)
        out = out.reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width_px, c)
        return out.astype(jnp.float32)


def forward_flops(spec: DiTSpec, image_size: int | None = None, text_length: int = 0) -> float:
    """Matmul FLOPs (2 per multiply-add) of one forward pass for one example; norms, activations
    and softmax left out, as unet_spec.forward_flops does."""
    size = image_size or spec.image_size
    n, d = (size // spec.patch_size) ** 2, spec.width
    ctx = spec.context_length(text_length)
    mlp = int(round(d * spec.mlp_ratio))
    per_block = (
        2 * n * d * 3 * d  # q, k, v
        + 2 * ctx * 2 * d * d  # context keys and values (context tokens are width d)
        + 2 * 2 * n * (n + ctx) * d  # logits and the weighted sum
        + 2 * n * d * d  # attention output
        + 2 * 2 * n * d * mlp  # MLP
        + 2 * d * 6 * d  # adaLN
    )
    text = 2 * text_length * spec.text_width * d if spec.text_width else 0
    clip = 2 * spec.clip_dim * d * (1 + spec.clip_tokens) if spec.clip_dim else 0
    edges = 2 * n * spec.patch_dim * d + 2 * n * d * spec.patch_size**2 * spec.image_channels + 2 * d * 2 * d
    time = 2 * (TIME_FREQUENCIES * d + d * d)
    return float(spec.depth * per_block + text + clip + edges + time)
