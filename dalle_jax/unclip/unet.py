"""The unCLIP decoder and upsampler networks: a GLIDE / ADM diffusion U-Net in Flax linen.

`UNet(spec)(x, t, clip_embedding, text_states, text_mask, low_res)` predicts the noise in a noisy
image x [B, H, W, image_channels] at diffusion step t [B]. The blocks are ADM's (Dhariwal & Nichol
2021): residual blocks with scale-shift GroupNorm from the timestep embedding, downsampling and
upsampling inside residual blocks (average pooling / nearest neighbour, ADM's "BigGAN" variant,
not strided convs), and self-attention at chosen resolutions. unCLIP's conditioning (Ramesh et al.
2022, section 2.1): the CLIP image embedding is projected and added to the timestep embedding and
projected into `clip_tokens` context tokens, followed by the caption's token states; every
attention block attends over its spatial positions plus those tokens (GLIDE's encoder_kv, Nichol
et al. 2021 section 4.1). The upsamplers take a low-resolution image instead, upsampled
bilinearly and concatenated to x (appendix C: no attention, no caption).

The sizes (`UNetSpec`, the paper presets, FLOPs) are in dalle_jax/unclip/unet_spec.py.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from core_jax.layers import Attention, param
from core_jax.modeling import constrain, dense, dtype_of, remat_policy
from dalle_jax.unclip.unet_spec import UNetSpec, check_spec, layout

ACT = ("act_batch", "act_height", "act_width", "act_channels")
TOKENS = ("act_batch", "act_length", "act_embed")

# PyTorch's default init of Linear and Conv2d (uniform within 1/sqrt(fan_in)), which ADM and GLIDE
# were trained with.
_torch_default = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# torch.nn.GroupNorm's epsilon, which ADM uses.
GROUP_NORM_EPS = 1e-5


def timestep_embedding(t, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """ADM's sinusoidal embedding of (possibly fractional) steps t [B] -> float32 [B, dim]: cosines
    then sines of t times frequencies from 1 down to 1 / max_period."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32).reshape(-1, 1) * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def clip_input(clip_embedding):
    """A unit-norm CLIP embedding [B, E] times sqrt(E): components of unit scale, like every other
    input, where unit norm leaves them at ~1/sqrt(E) (0.03 at the paper's E = 1024) and the
    conditioning starts as a whisper beside the timestep embedding. DALLE2-pytorch scales its
    embeddings by sqrt(E) the same way (`image_embed_scale`)."""
    return clip_embedding * jnp.sqrt(jnp.float32(clip_embedding.shape[-1]))


def conditioning(
    module, spec, emb, clip_embedding, text_states, text_mask, width: int, dtype, clip_tokens: bool
):
    """unCLIP's conditioning (section 2.1), shared by the U-Net and the DiT: (the timestep embedding
    [B, width] plus the projected CLIP embedding, the context tokens [B, C, width] attention reads
    (`clip_tokens` projections of the embedding when `clip_tokens`, then the caption's token states)
    or None, their bool mask [B, C] or None)."""
    b = emb.shape[0]
    context, context_mask = [], []
    if spec.clip_dim:
        clip_embedding = clip_input(clip_embedding)
        emb = emb + linear(module, "clip_emb", clip_embedding, width, ("embed", "mlp"), dtype)
        if clip_tokens and spec.clip_tokens:
            tokens = linear(
                module, "clip_tokens", clip_embedding, spec.clip_tokens * width, ("embed", "mlp"), dtype
            )
            context.append(tokens.reshape(b, spec.clip_tokens, width))
            context_mask.append(jnp.ones((b, spec.clip_tokens), bool))
    if spec.text_width:
        context.append(linear(module, "text_proj", text_states, width, ("embed", "mlp"), dtype))
        length = text_states.shape[1]
        context_mask.append(jnp.ones((b, length), bool) if text_mask is None else text_mask.astype(bool))
    emb = constrain(emb, ("act_batch", "act_embed"))
    if not context:
        return emb, None, None
    return emb, constrain(jnp.concatenate(context, axis=1), TOKENS), jnp.concatenate(context_mask, axis=1)


def with_low_res(x, low_res):
    """An upsampler's input: x [B, H, W, C] with the low-resolution image resized bilinearly to
    H x W and concatenated as extra channels (float32)."""
    b, height, width, _ = x.shape
    up = jax.image.resize(low_res.astype(jnp.float32), (b, height, width, low_res.shape[-1]), "linear")
    return jnp.concatenate([x.astype(jnp.float32), up], axis=-1)


def group_norm(groups: int, dtype, name: str) -> nn.GroupNorm:
    """GroupNorm (float32 statistics) with float32 params carrying the `norm` axis name."""
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=GROUP_NORM_EPS,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
    )


def linear(module: nn.Module, name: str, x, features: int, axes: tuple[str, str], dtype, zero: bool = False):
    """x [..., in] @ `{name}_kernel` [in, features] + `{name}_bias`, in the compute dtype; `zero`
    initialises the kernel to zeros (a layer that starts switched off)."""
    init = nn.initializers.zeros if zero else _torch_default
    kernel = param(module, f"{name}_kernel", init, (x.shape[-1], features), axes)
    bias = param(module, f"{name}_bias", nn.initializers.zeros, (features,), axes[1:])
    return dense(x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)


def resample(x, how: str):
    """2x2 average pooling ("down") or nearest-neighbour x2 ("up") of NHWC activations."""
    b, h, w, c = x.shape
    if how == "down":
        return constrain(x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)), ACT)
    return constrain(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), ACT)


class Conv(nn.Module):
    """'same'-padded stride-1 conv with an HWIO kernel carrying logical axis names."""

    features: int
    kernel_size: int = 3
    zero_init: bool = False  # residual branches and the output start at zero, as in ADM
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, dtype = self.kernel_size, self.dtype
        init = nn.initializers.zeros if self.zero_init else _torch_default
        kernel = param(
            self,
            "kernel",
            init,
            (k, k, x.shape[-1], self.features),
            ("conv_h", "conv_w", "conv_in", "conv_out"),
        )
        bias = param(self, "bias", nn.initializers.zeros, (self.features,), ("conv_out",))
        if k == 1:  # a matmul over channels
            y = dense(x.astype(dtype), kernel[0, 0].astype(dtype))
        else:
            y = jax.lax.conv_general_dilated(
                x.astype(dtype),
                kernel.astype(dtype),
                window_strides=(1, 1),
                padding="SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
        return constrain(y + bias.astype(dtype), ACT)


class ResBlock(nn.Module):
    """ADM's residual block: GroupNorm-SiLU-conv, then GroupNorm scaled and shifted by the
    embedding (h * (1 + scale) + shift; Dhariwal & Nichol 2021, section 3.1), SiLU, dropout and a
    zero-initialised conv, added to x (through a 1x1 conv when the width changes). `resample`
    "down" / "up" pools / repeats both paths between the first norm and conv."""

    channels: int
    groups: int
    dropout: float = 0.0
    resample: str = ""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, emb, deterministic: bool = True):
        dtype = self.dtype
        h = nn.silu(group_norm(self.groups, dtype, "in_norm")(x))
        if self.resample:
            h, x = resample(h, self.resample), resample(x, self.resample)
        h = Conv(self.channels, dtype=dtype, name="in_conv")(h)
        scale_shift = linear(self, "emb", nn.silu(emb), 2 * self.channels, ("embed", "conv_out"), dtype)
        scale, shift = jnp.split(scale_shift[:, None, None, :], 2, axis=-1)
        h = group_norm(self.groups, dtype, "out_norm")(h) * (1 + scale) + shift
        h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
        h = Conv(self.channels, zero_init=True, dtype=dtype, name="out_conv")(h)
        skip = x if x.shape[-1] == self.channels else Conv(self.channels, 1, dtype=dtype, name="skip")(x)
        return constrain(skip.astype(dtype) + h, ACT)


class AttentionBlock(nn.Module):
    """GroupNorm, then the shared Attention over the H*W positions (plus the context tokens), with
    a zero-initialised output projection, added to x."""

    head_channels: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, context_mask=None):
        b, height, width, ch = x.shape
        h = group_norm(self.groups, self.dtype, "norm")(x).reshape(b, height * width, ch)
        h = Attention(
            num_heads=ch // self.head_channels,
            out_std=0.0,
            float32_logits=True,
            dtype=self.dtype,
            name="attn",
        )(constrain(h, TOKENS), context=context, context_mask=context_mask)
        return constrain(x + h.reshape(b, height, width, ch), ACT)


class UNet(nn.Module):
    """The diffusion U-Net; see the module docstring. Output: float32 [B, H, W, image_channels], the
    predicted noise. The variance is fixed (not learned as in GLIDE): learning it is fragile in
    small models, and a fixed-variance sampler needs only the noise."""

    spec: UNetSpec

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
        """x [B, H, W, image_channels] (H, W halving len(channel_mult) - 1 times); t [B] steps;
        clip_embedding [B, clip_dim] (when clip_dim > 0; zeros are a valid "no embedding");
        text_states [B, L, text_width] and text_mask bool [B, L] (when text_width > 0; None mask:
        all attendable; an all-False row is a valid "no caption"); low_res [B, h, w,
        low_res_channels] (upsamplers). `deterministic=False` applies dropout (rng 'dropout')."""
        spec, dtype = self.spec, dtype_of(self.spec.dtype)
        _check_inputs(spec, x, t, clip_embedding, text_states, text_mask, low_res)
        b, height, width, _ = x.shape
        emb_width = spec.emb_width

        emb = timestep_embedding(t, spec.model_channels)
        emb = linear(self, "time_fc", emb, emb_width, ("embed", "mlp"), dtype)
        emb = linear(self, "time_proj", nn.silu(emb), emb_width, ("mlp", "embed"), dtype)
        emb, context, context_mask = conditioning(
            self, spec, emb, clip_embedding, text_states, text_mask, emb_width, dtype, spec.has_context
        )

        if spec.low_res_channels:
            x = with_low_res(x, low_res)
        res_block, attention_block = ResBlock, AttentionBlock
        if spec.remat != "none":
            policy = remat_policy(spec.remat)
            res_block = nn.remat(ResBlock, policy=policy, prevent_cse=True, static_argnums=(3,))
            attention_block = nn.remat(AttentionBlock, policy=policy, prevent_cse=True)

        h = Conv(spec.channel_mult[0] * spec.model_channels, dtype=dtype, name="input_conv")(
            constrain(x, ACT)
        )
        skips = [h]
        for block in layout(spec):
            if block.takes_skip:
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            if block.kind == "res":
                h = res_block(
                    block.channels, spec.norm_groups, spec.dropout, block.resample, dtype, name=block.name
                )(h, emb, deterministic)
            else:
                h = attention_block(spec.head_channels, spec.norm_groups, dtype, name=block.name)(
                    h, context, context_mask
                )
            if block.saves_skip:
                skips.append(h)
        h = nn.silu(group_norm(spec.norm_groups, dtype, "out_norm")(h))
        return Conv(spec.image_channels, zero_init=True, dtype=dtype, name="out_conv")(h).astype(jnp.float32)


def _check_inputs(spec: UNetSpec, x, t, clip_embedding, text_states, text_mask, low_res):
    """Shape errors here name the input, not an XLA dot deep inside."""
    step = 2 ** (spec.num_levels - 1)
    if x.ndim != 4 or x.shape[-1] != spec.image_channels or x.shape[1] % step or x.shape[2] % step:
        raise ValueError(
            f"unet: x must be [B, H, W, {spec.image_channels}] with H and W multiples of {step}, got {x.shape}"
        )
    b = x.shape[0]
    if jnp.shape(t) != (b,):
        raise ValueError(f"unet: t must be [{b}], got {jnp.shape(t)}")
    if spec.clip_dim and (clip_embedding is None or clip_embedding.shape != (b, spec.clip_dim)):
        got = None if clip_embedding is None else clip_embedding.shape
        raise ValueError(f"unet: clip_embedding must be [{b}, {spec.clip_dim}] (zeros for none), got {got}")
    if spec.text_width:
        if text_states is None or text_states.ndim != 3 or text_states.shape[::2] != (b, spec.text_width):
            got = None if text_states is None else text_states.shape
            raise ValueError(f"unet: text_states must be [{b}, L, {spec.text_width}], got {got}")
        if text_mask is not None and text_mask.shape != text_states.shape[:2]:
            raise ValueError(f"unet: text_mask must be [{b}, {text_states.shape[1]}], got {text_mask.shape}")
    if spec.low_res_channels and (
        low_res is None or low_res.ndim != 4 or low_res.shape[::3] != (b, spec.low_res_channels)
    ):
        got = None if low_res is None else low_res.shape
        raise ValueError(f"unet: low_res must be [{b}, h, w, {spec.low_res_channels}], got {got}")


def unet_from_spec(spec: UNetSpec) -> UNet:
    """The module for a checked spec (ConfigError naming the field that does not build)."""
    return UNet(check_spec(spec))


def example_inputs(spec: UNetSpec, batch_size: int = 1, image_size: int | None = None, text_length: int = 1):
    """Zero inputs of the right shapes: (x, t) and the conditioning keywords the spec takes."""
    size = image_size or spec.min_size  # the params do not depend on the size
    x = jnp.zeros((batch_size, size, size, spec.image_channels), jnp.float32)
    kwargs = {}
    if spec.clip_dim:
        kwargs["clip_embedding"] = jnp.zeros((batch_size, spec.clip_dim), jnp.float32)
    if spec.text_width:
        kwargs["text_states"] = jnp.zeros((batch_size, text_length, spec.text_width), jnp.float32)
        kwargs["text_mask"] = jnp.ones((batch_size, text_length), bool)
    if spec.low_res_channels:
        kwargs["low_res"] = jnp.zeros((batch_size, size, size, spec.low_res_channels), jnp.float32)
    return (x, jnp.zeros((batch_size,), jnp.float32)), kwargs


def init_params(model: UNet, rng):
    """Boxed params (nn.Partitioned leaves carrying logical names).

    The initialisers draw with the non-partitionable Threefry: XLA:CPU takes seconds to compile
    each partitionable draw, and a U-Net makes one per kernel, so a trainer's jitted init took
    minutes on 2 cores. The values do not depend on sharding either way.
    """
    args, kwargs = example_inputs(model.spec)
    with jax.threefry_partitionable(False):
        return model.init({"params": rng}, *args, **kwargs)["params"]


def abstract_params(model: UNet):
    """Shapes / dtypes of the boxed params without allocating them."""
    return jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0))


def param_count(spec: UNetSpec) -> int:
    """Parameters of the U-Net a spec builds (counted on abstract shapes: no memory)."""
    leaves = jax.tree.leaves(nn.meta.unbox(abstract_params(unet_from_spec(spec))))
    return sum(math.prod(leaf.shape) for leaf in leaves)
