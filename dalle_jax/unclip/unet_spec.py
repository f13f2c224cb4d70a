"""What a diffusion U-Net is made of: its spec, the paper's sizes, its block layout and its FLOPs.

The network itself is dalle_jax/unclip/unet.py; this module is plain Python (no jax), so configs
and FLOP counts read it without building anything.
"""

from __future__ import annotations

import dataclasses

from core_jax.errors import ConfigError
from core_jax.modeling import REMAT_POLICIES

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class UNetSpec:
    """A GLIDE / ADM U-Net (Nichol et al. 2021; Dhariwal & Nichol 2021), frozen so that linen
    modules can hold it. Each conditioning is optional: 0 switches it off."""

    model_channels: int  # C: the first level's width; the timestep embedding is 4C wide
    channel_mult: tuple[int, ...]  # each level's width as a multiple of C, finest level first
    num_res_blocks: int  # residual blocks per level on the way down (one more on the way up)
    image_size: int = 64  # the resolution that attention_resolutions refer to
    attention_resolutions: tuple[int, ...] = ()  # feature-map sizes (at image_size) with attention
    head_channels: int = 64  # channels per attention head
    dropout: float = 0.0
    norm_groups: int = 32  # GroupNorm groups; must divide model_channels
    image_channels: int = 3  # the noisy input's channels, and the output's
    low_res_channels: int = 0  # upsamplers: the low-resolution image's channels (0: not an upsampler)
    clip_dim: int = 0  # CLIP image embedding width (0: no CLIP conditioning)
    clip_tokens: int = 4  # context tokens projected from the CLIP embedding
    text_width: int = 0  # caption token states' width (0: no caption)
    dtype: str = "float32"  # compute dtype; params stay float32
    remat: str = "none"  # core_jax.modeling.REMAT_POLICIES, applied per block

    @property
    def emb_width(self) -> int:
        """The timestep embedding's width, 4C as in ADM; the context tokens have it too (for the
        paper decoder 4 x 512 = 2048, the width of GLIDE's text encoder, Nichol et al. 2021 s4.1)."""
        return 4 * self.model_channels

    @property
    def min_size(self) -> int:
        """The smallest input side the network takes (params do not depend on the size)."""
        return 2 ** (self.num_levels - 1)

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @property
    def has_attention(self) -> bool:
        return bool(self.attention_resolutions)

    @property
    def has_context(self) -> bool:
        """Whether attention reads context tokens (CLIP tokens and / or caption states)."""
        return self.has_attention and ((self.clip_dim > 0 and self.clip_tokens > 0) or self.text_width > 0)

    def context_length(self, text_length: int) -> int:
        """Context tokens each attention block reads: the CLIP tokens, then the caption's."""
        if not self.has_context:
            return 0
        return (self.clip_tokens if self.clip_dim else 0) + (text_length if self.text_width else 0)


# unCLIP's networks (Ramesh et al. 2022, arXiv 2204.06125, appendix C, Table 3), at the resolution
# each is applied at. The decoder is GLIDE's 64x64 model (Nichol et al. 2021, section 4.1: ADM's
# ImageNet 64 architecture at 512 channels) with unCLIP's CLIP conditioning (section 2.1); it reads
# the caption from CLIP's text tower instead of GLIDE's own 1.2B text transformer, so clip_dim and
# text_width are the paper CLIP's (appendix C: text width 1024; section 2.2: 1,024-dim embeddings).
# The upsamplers are ADMNets without attention or caption (appendix C), conditioned on the low-res
# image. All use scale-shift norm (AdaGN) and residual up/down-sampling, as ADM does (Dhariwal &
# Nichol 2021, section 3: "BigGAN residual blocks for upsampling and downsampling"; 3.1: AdaGN).
PRESETS: dict[str, UNetSpec] = {
    # Table 3, column "64": 3.5B (incl. GLIDE's text encoder), channels 512, depth 3, channel
    # multiple 1,2,3,4, head channels 64, attention resolution 32,16,8, dropout 0.1; section 2.1:
    # four CLIP tokens.
    "decoder_paper": UNetSpec(
        model_channels=512,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        image_size=64,
        attention_resolutions=(32, 16, 8),
        head_channels=64,
        dropout=0.1,
        clip_dim=1024,
        clip_tokens=4,
        text_width=1024,
    ),
    # Table 3, column "64 -> 256": 700M, channels 320, depth 3, channel multiple 1,2,3,4, no
    # attention, dropout 0.1.
    "upsampler_64_256_paper": UNetSpec(
        model_channels=320,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        image_size=256,
        dropout=0.1,
        low_res_channels=3,
    ),
    # Table 3, column "256 -> 1024": 300M, channels 192, depth 2, channel multiple 1,1,2,2,4,4, no
    # attention, no dropout.
    "upsampler_256_1024_paper": UNetSpec(
        model_channels=192,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        image_size=1024,
        low_res_channels=3,
    ),
}

# The parameter counts Table 3 gives ("Model size"), and the part of the decoder's that is GLIDE's
# text encoder (Nichol et al. 2021, section 4.1: "roughly 2.3 billion parameters for the visual
# part", "roughly 1.2 billion" for the text transformer), which ours does not contain.
PAPER_PARAMS = {
    "decoder_paper": 3.5e9,
    "upsampler_64_256_paper": 700e6,
    "upsampler_256_1024_paper": 300e6,
}
GLIDE_VISUAL_PARAMS = 2.3e9


def check_spec(spec: UNetSpec) -> UNetSpec:
    """The spec if it builds a U-Net, else a ConfigError naming the first field that does not."""
    c, mult = spec.model_channels, spec.channel_mult
    if c <= 0 or not mult or any(m <= 0 for m in mult) or spec.num_res_blocks <= 0:
        raise ConfigError(
            f"unet: model_channels ({c}), every channel_mult {tuple(mult)} and num_res_blocks "
            f"({spec.num_res_blocks}) must be positive"
        )
    if spec.norm_groups <= 0 or c % spec.norm_groups:
        raise ConfigError(f"unet: norm_groups={spec.norm_groups} must divide model_channels={c}")
    levels = [spec.image_size // 2**level for level in range(spec.num_levels)]
    if spec.image_size % 2 ** (spec.num_levels - 1):
        raise ConfigError(
            f"unet: image_size={spec.image_size} does not halve {spec.num_levels - 1} times "
            f"(channel_mult has {spec.num_levels} levels)"
        )
    unknown = sorted(set(spec.attention_resolutions) - set(levels))
    if unknown:
        raise ConfigError(f"unet: attention_resolutions {unknown} are not among the levels' sizes {levels}")
    for level, m in enumerate(mult):
        if levels[level] in spec.attention_resolutions and (m * c) % spec.head_channels:
            raise ConfigError(
                f"unet: head_channels={spec.head_channels} must divide the attention width {m * c} "
                f"(level {level})"
            )
    if not 0.0 <= spec.dropout < 1.0:
        raise ConfigError(f"unet: dropout must be in [0, 1), got {spec.dropout}")
    if spec.image_channels <= 0:
        raise ConfigError(f"unet: image_channels must be positive, got {spec.image_channels}")
    if min(spec.low_res_channels, spec.clip_dim, spec.text_width) < 0:
        raise ConfigError("unet: low_res_channels, clip_dim and text_width must be >= 0 (0: absent)")
    if spec.clip_dim and spec.clip_tokens < 0:
        raise ConfigError(f"unet: clip_tokens must be >= 0, got {spec.clip_tokens}")
    if spec.text_width and not spec.has_attention:
        raise ConfigError("unet: a caption (text_width > 0) is read by attention; set attention_resolutions")
    if spec.dtype not in DTYPES:
        raise ConfigError(f"unet: dtype must be one of {DTYPES}, got {spec.dtype!r}")
    if spec.remat not in REMAT_POLICIES:
        raise ConfigError(f"unet: remat must be one of {REMAT_POLICIES}, got {spec.remat!r}")
    return spec


@dataclasses.dataclass(frozen=True)
class Block:
    """One block of the U-Net after its input conv, in the order they run."""

    kind: str  # "res" (residual block) or "attn" (attention block)
    name: str  # its param subtree
    channels_in: int  # with the skip concatenated, when it takes one
    channels: int  # output channels
    factor: int  # its input's resolution is the image's divided by this
    resample: str = ""  # res blocks: "down" halves the resolution, "up" doubles it
    takes_skip: bool = False  # concatenates the newest saved activation to its input
    saves_skip: bool = False  # its output is saved for the way up


def layout(spec: UNetSpec) -> list[Block]:
    """ADM's U-Net (Dhariwal & Nichol 2021) as a list of blocks: per level num_res_blocks residual
    blocks (each followed by attention at attention_resolutions) then a downsampling residual block;
    the middle (res, attention when the coarsest level has it, res); per level on the way up
    num_res_blocks + 1 residual blocks, each reading one saved activation, then an upsampling
    residual block. The input conv's output is the first saved activation."""
    c, n = spec.model_channels, spec.num_levels
    widths = [m * c for m in spec.channel_mult]
    attention = {lv for lv in range(n) if spec.image_size // 2**lv in spec.attention_resolutions}
    blocks: list[Block] = []
    ch, skips = widths[0], [widths[0]]

    def res(name, channels, factor, channels_in=None, **kw):
        blocks.append(Block("res", name, channels_in or ch, channels, factor, **kw))
        return channels

    def attn(name, factor, **kw):
        blocks.append(Block("attn", name, ch, ch, factor, **kw))

    for level, width in enumerate(widths):
        f = 2**level
        for i in range(spec.num_res_blocks):
            ch = res(f"down_{level}_res_{i}", width, f, saves_skip=level not in attention)
            if level in attention:
                attn(f"down_{level}_attn_{i}", f, saves_skip=True)
            skips.append(ch)
        if level < n - 1:
            ch = res(f"down_{level}_resample", ch, f, resample="down", saves_skip=True)
            skips.append(ch)
    f = 2 ** (n - 1)
    ch = res("middle_res_0", ch, f)
    if n - 1 in attention:
        attn("middle_attn", f)
    ch = res("middle_res_1", ch, f)
    for level in reversed(range(n)):
        f = 2**level
        for i in range(spec.num_res_blocks + 1):
            skip = skips.pop()
            ch = res(f"up_{level}_res_{i}", widths[level], f, channels_in=ch + skip, takes_skip=True)
            if level in attention:
                attn(f"up_{level}_attn_{i}", f)
        if level:
            ch = res(f"up_{level}_resample", ch, f, resample="up")
    assert not skips, skips
    return blocks


def forward_flops(spec: UNetSpec, image_size: int | None = None, text_length: int = 0) -> float:
    """Matmul and conv FLOPs (2 per multiply-add) of one forward pass for one example at
    image_size (default spec.image_size) with text_length caption tokens; norms, activations and
    softmax are left out."""
    size = image_size or spec.image_size
    emb, c = spec.emb_width, spec.model_channels
    context = spec.context_length(text_length)

    def conv(factor, k, cin, cout):
        return 2.0 * (size // factor) ** 2 * k * k * cin * cout

    flops = 2.0 * (c * emb + emb * emb)  # timestep MLP
    if spec.clip_dim:
        flops += 2.0 * spec.clip_dim * emb
        if spec.has_context:
            flops += 2.0 * spec.clip_dim * spec.clip_tokens * emb
    if spec.text_width and spec.has_context:
        flops += 2.0 * text_length * spec.text_width * emb
    flops += conv(1, 3, spec.image_channels + spec.low_res_channels, spec.channel_mult[0] * c)
    for b in layout(spec):
        if b.kind == "res":
            out = {"down": b.factor * 2, "up": b.factor // 2}.get(b.resample, b.factor)
            flops += conv(out, 3, b.channels_in, b.channels) + conv(out, 3, b.channels, b.channels)
            flops += 2.0 * emb * 2 * b.channels  # scale and shift from the embedding
            if b.channels_in != b.channels:
                flops += conv(out, 1, b.channels_in, b.channels)
        else:
            n, ch = (size // b.factor) ** 2, b.channels
            flops += 2.0 * n * ch * 4 * ch  # q, k, v and output projections
            flops += 2.0 * 2 * n * (n + context) * ch  # logits and the weighted sum of values
            flops += 2.0 * context * emb * 2 * ch  # the context's keys and values
    flops += conv(1, 3, spec.channel_mult[0] * c, spec.image_channels)
    return flops


def train_flops_per_example(spec: UNetSpec, image_size: int | None = None, text_length: int = 0) -> float:
    """Forward + backward FLOPs of one training example (3x the forward), for MFU reports."""
    return 3.0 * forward_flops(spec, image_size, text_length)
