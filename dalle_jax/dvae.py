"""The discrete VAE of DALL-E (OpenAI's architecture, sizes from config), as Flax linen modules.

Images are NHWC floats already mapped into [eps, 1 - eps] (`image_ops.map_pixels`). The encoder gives
codebook logits [B, h, w, vocab]; the decoder takes codes, either int tokens [B, h, w] (an embedding
lookup) or one-hot / relaxed one-hot [B, h, w, vocab] (a 1x1 conv, which is what training feeds it),
and returns 6 channels per pixel: logit-Laplace location (logits of the mapped pixel) and log-scale.

Parameter names mirror OpenAI's modules (`input`, `group_g/block_b/{id_path,conv_1..4}`, `output`)
so that `convert_dvae.py` is a plain rename plus OIHW -> HWIO transpose.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from core_jax.errors import ConfigError
from core_jax.modeling import constrain, dense, dtype_of, remat_policy

ENCODER_KERNELS = (3, 3, 3, 1)
DECODER_KERNELS = (1, 3, 3, 3)
ACT = ("act_batch", "act_height", "act_width", "act_channels")

# OpenAI's init: normal with std 1/sqrt(fan_in), zero bias.
_fan_in_normal = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


def _kernel_init(key, shape, dtype=jnp.float32):
    # XLA:CPU takes seconds to compile each partitionable-threefry draw (measured ~1.5 CPU-s per
    # kernel on jax 0.12, ~40 s for this model); the classic threefry compiles ~7x faster. dVAE
    # kernels are small enough (<= 64 MiB) that generating them unpartitioned costs nothing.
    with jax.threefry_partitionable(False):
        return _fan_in_normal(key, shape, dtype)


def _scaled(init, scale: float):
    if scale == 1.0:
        return init
    return lambda key, shape, dtype=jnp.float32: init(key, shape, dtype) * scale


class Conv(nn.Module):
    """'same'-padded stride-1 conv with an HWIO kernel annotated by logical axis names."""

    features: int
    kernel_size: int
    dtype: Any = jnp.float32
    init_scale: float = 1.0  # multiplies OpenAI's fan-in init

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                _scaled(_kernel_init, self.init_scale), ("conv_h", "conv_w", "conv_in", "conv_out")
            ),
            (k, k, x.shape[-1], self.features),
            jnp.float32,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
            (self.features,),
            jnp.float32,
        )
        if k == 1:  # a 1x1 conv is a matmul over channels; XLA handles it better as one
            y = dense(x.astype(self.dtype), kernel[0, 0].astype(self.dtype))
        else:
            y = jax.lax.conv_general_dilated(
                x.astype(self.dtype),
                kernel.astype(self.dtype),
                window_strides=(1, 1),
                padding="SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
        return y + bias.astype(self.dtype)


class ResBlock(nn.Module):
    """out = id_path(x) + res_path(x) / n_layers**2; the small gain keeps a deep stack near identity
    at init, so it trains without normalisation layers.

    `upsample_input`: the block's input is x upsampled x2 (nearest). A 1x1 conv (and ReLU) commutes
    with nearest upsampling, so id_path and a leading 1x1 conv run at the low resolution and only
    their (narrower) outputs are upsampled: the same values for a quarter of those FLOPs (the decoder
    enters every group after the first this way)."""

    features: int
    kernels: Sequence[int]
    n_layers: int
    dtype: Any = jnp.float32
    upsample_input: bool = False

    @nn.compact
    def __call__(self, x):
        if self.features % 4:
            raise ValueError(f"dVAE block width must be divisible by 4, got {self.features}")
        hidden = self.features // 4
        late = self.upsample_input and self.kernels[0] == 1
        if self.upsample_input and not late:
            x = upsample_2x(x)  # a first kernel wider than 1x1 sees neighbours: upsample first
        up = upsample_2x if late else (lambda t: t)
        identity = (
            x if x.shape[-1] == self.features else Conv(self.features, 1, dtype=self.dtype, name="id_path")(x)
        )
        identity = up(identity)
        h = x
        for i, k in enumerate(self.kernels):
            width = self.features if i == len(self.kernels) - 1 else hidden
            h = Conv(width, k, dtype=self.dtype, name=f"conv_{i + 1}")(nn.relu(h))
            if i == 0:
                h = up(h)
        return identity + h * jnp.asarray(1.0 / self.n_layers**2, h.dtype)


def upsample_2x(x):
    """Nearest-neighbour x2 upsampling of NHWC activations."""
    return constrain(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), ACT)


class ResGroup(nn.Module):
    features: int
    num_blocks: int
    kernels: Sequence[int]
    n_layers: int
    dtype: Any = jnp.float32
    remat: str = "none"
    upsample_input: bool = False  # the group's input is upsampled x2 (in its first block)

    @nn.compact
    def __call__(self, x):
        block = ResBlock
        if self.remat != "none":
            block = nn.remat(ResBlock, policy=remat_policy(self.remat), prevent_cse=True)
        for b in range(self.num_blocks):
            x = block(
                self.features,
                tuple(self.kernels),
                self.n_layers,
                self.dtype,
                self.upsample_input and b == 0,
                name=f"block_{b + 1}",
            )(x)
            x = constrain(x, ACT)
        return x


def max_pool_2x2(x):
    """2x2 max-pool, stride 2, as a reshape + max: same values as nn.max_pool, and its gradient is
    several times cheaper on CPU than reduce_window's select-and-scatter."""
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"dVAE max-pool needs even height and width, got {h}x{w}")
    return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


LOGITS_ACT = ("act_batch", "act_height", "act_width", "act_vocab")


class Encoder(nn.Module):
    """mapped image [B, H, W, C] -> float32 codebook logits [B, H/2^(G-1), W/2^(G-1), vocab].

    `trunk` and `logit_conv` are separate methods so that a variant (dalle_jax/experiments) can
    read other inputs or combine the logits differently around the same stack and parameter names.
    """

    vocab_size: int = 8192
    hidden: int = 256
    width_multipliers: Sequence[int] = (1, 2, 4, 8)
    blocks_per_group: int = 2
    dtype: Any = jnp.float32
    remat: str = "none"
    logit_init_scale: float = 1.0
    logit_norm: bool = False

    @nn.compact
    def __call__(self, x):
        return constrain(self.logit_conv(self.trunk(x), self.vocab_size), LOGITS_ACT)

    def trunk(self, x):
        """The 7x7 input conv, the groups and the final ReLU (and `logit_norm`): the features the
        logit conv reads, [B, h, w, hidden * last multiplier]."""
        n_groups = len(self.width_multipliers)
        n_layers = n_groups * self.blocks_per_group
        x = Conv(self.hidden, 7, dtype=self.dtype, name="input")(x)
        for g, mult in enumerate(self.width_multipliers):
            x = ResGroup(
                self.hidden * mult,
                self.blocks_per_group,
                ENCODER_KERNELS,
                n_layers,
                self.dtype,
                self.remat,
                name=f"group_{g + 1}",
            )(x)
            if g < n_groups - 1:
                x = max_pool_2x2(x)
        x = nn.relu(x)
        if self.logit_norm:
            # Not in OpenAI's model (their weights have no such layer). Bounds the scale of the
            # features the logits are made from; in the shapes runs (batch 8, with the usage and
            # confidence terms) it gave 22.9 vs 20.4 dB at step 600 (docs/dvae.md, "Measured").
            x = nn.LayerNorm(
                dtype=jnp.float32,
                param_dtype=jnp.float32,
                name="output_norm",
                scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
            )(x)
        return x

    def logit_conv(self, features, num_logits: int):
        # Logits in float32 (as OpenAI does): the softmax over 8192 codes is precision-sensitive.
        return Conv(num_logits, 1, dtype=jnp.float32, init_scale=self.logit_init_scale, name="output")(
            features
        )


class CodeEmbedding(nn.Module):
    """The decoder's first 1x1 conv from `vocab` one-hot channels, which is an embedding table:
    int tokens take the lookup, (relaxed) one-hot codes the matmul; both use the same kernel.

    A variant may store fewer rows (`num_rows`) and build the [vocab] table from them
    (`code_kernel`); the lookup and the matmul then read that table."""

    features: int
    vocab_size: int
    dtype: Any = jnp.float32
    init_std: float = 0.0  # 0: OpenAI's fan-in init (std 1/sqrt(vocab)); > 0: embedding-style normal

    @nn.compact
    def __call__(self, codes):
        init = _kernel_init if self.init_std <= 0 else nn.initializers.normal(self.init_std)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(init, ("conv_h", "conv_w", "vocab", "conv_out")),
            (1, 1, self.num_rows(), self.features),
            jnp.float32,
        )
        kernel = self.code_kernel(kernel)
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
            (self.features,),
            jnp.float32,
        )
        table = kernel[0, 0]
        if jnp.issubdtype(codes.dtype, jnp.integer):
            y = jnp.take(table, codes, axis=0)
        else:
            if codes.shape[-1] != self.vocab_size:
                raise ValueError(
                    f"decoder codes have {codes.shape[-1]} channels, expected vocab_size={self.vocab_size}"
                )
            # float32 like OpenAI's input conv: a relaxed one-hot over 8192 codes loses a lot in bf16.
            y = dense(codes.astype(jnp.float32), table)
        return (y + bias).astype(self.dtype)

    def num_rows(self) -> int:
        return self.vocab_size

    def code_kernel(self, kernel):
        """The stored kernel [1, 1, num_rows, features] -> one row per code [1, 1, vocab, features]."""
        return kernel


class Decoder(nn.Module):
    """codes (int [B, h, w] or float [B, h, w, vocab]) -> float32 [B, H, W, 2 * output_channels]."""

    vocab_size: int = 8192
    hidden: int = 256
    width_multipliers: Sequence[int] = (1, 2, 4, 8)  # encoder order; the decoder runs them reversed
    blocks_per_group: int = 2
    init_channels: int = 128
    output_channels: int = 3
    dtype: Any = jnp.float32
    remat: str = "none"
    embed_init_std: float = 0.0

    @nn.compact
    def __call__(self, codes):
        n_groups = len(self.width_multipliers)
        n_layers = n_groups * self.blocks_per_group
        x = self.code_embedding()(codes)
        x = constrain(x, ACT)
        for g, mult in enumerate(reversed(self.width_multipliers)):
            # Nearest x2 upsampling between groups, done inside the next group's first block.
            x = ResGroup(
                self.hidden * mult,
                self.blocks_per_group,
                DECODER_KERNELS,
                n_layers,
                self.dtype,
                self.remat,
                upsample_input=g > 0,
                name=f"group_{g + 1}",
            )(x)
        return Conv(2 * self.output_channels, 1, dtype=jnp.float32, name="output")(nn.relu(x))

    def code_embedding(self) -> CodeEmbedding:
        """The `input` module: codes -> [B, h, w, init_channels]."""
        return CodeEmbedding(
            self.init_channels, self.vocab_size, self.dtype, self.embed_init_std, name="input"
        )


class DVAE(nn.Module):
    """Encoder + decoder under one param tree {'encoder': ..., 'decoder': ...}. A variant swaps
    either half through `make_encoder` / `make_decoder`, which receive these fields."""

    vocab_size: int = 8192
    hidden: int = 256
    width_multipliers: Sequence[int] = (1, 2, 4, 8)
    blocks_per_group: int = 2
    decoder_init_channels: int = 128
    input_channels: int = 3
    dtype: Any = jnp.float32
    remat: str = "none"
    logit_init_scale: float = 1.0
    embed_init_std: float = 0.0
    logit_norm: bool = False

    def setup(self):
        shared = dict(
            vocab_size=self.vocab_size,
            hidden=self.hidden,
            width_multipliers=tuple(self.width_multipliers),
            blocks_per_group=self.blocks_per_group,
            dtype=self.dtype,
            remat=self.remat,
        )
        self.encoder = self.make_encoder(
            **shared, logit_init_scale=self.logit_init_scale, logit_norm=self.logit_norm
        )
        self.decoder = self.make_decoder(
            **shared,
            init_channels=self.decoder_init_channels,
            output_channels=self.input_channels,
            embed_init_std=self.embed_init_std,
        )

    def make_encoder(self, **fields) -> Encoder:
        return Encoder(**fields)

    def make_decoder(self, **fields) -> Decoder:
        return Decoder(**fields)

    def __call__(self, x):
        """Encode then decode the argmax codes (used for init)."""
        logits = self.encoder(x)
        return logits, self.decoder(jnp.argmax(logits, axis=-1))

    def encode(self, x):
        if x.ndim != 4 or x.shape[-1] != self.input_channels:
            raise ValueError(
                f"dVAE encoder expects NHWC images with {self.input_channels} channels, got shape {x.shape}"
            )
        return self.encoder(x)

    def decode(self, codes):
        return self.decoder(codes)


def downsample_factor(model_config) -> int:
    return 2 ** (len(model_config.width_multipliers) - 1)


def grid_size(model_config, image_size: int) -> int:
    """Token grid side for `image_size` inputs; a clear error when the pools do not divide it."""
    factor = downsample_factor(model_config)
    if image_size < factor:
        raise ConfigError(f"image_size must be >= the dVAE's downsampling factor {factor}, got {image_size}")
    if image_size % factor:
        raise ConfigError(
            f"image_size {image_size} is not divisible by the dVAE's downsampling factor "
            f"{factor} (2^(groups-1) with {len(model_config.width_multipliers)} groups)"
        )
    return image_size // factor


def dvae_fields(model_config, compute_dtype: str = "float32", remat: str = "none") -> dict:
    """The DVAE module's fields from `config.model` (configs/dvae_openai.py lists the keys),
    checked; experiments build from the same fields (dalle_jax/dvae_models.py)."""
    mults = tuple(int(m) for m in model_config.width_multipliers)
    if not mults:
        raise ConfigError("model.width_multipliers must name at least one group")
    for m in mults:
        if (int(model_config.hidden) * m) % 4:
            raise ConfigError(
                f"model.hidden * width multiplier must be divisible by 4, got {model_config.hidden} * {m}"
            )
    # config.json of a workdir trained with a product codebook of free digits, which no version
    # builds any more: refused by name, not as a parameter-shape mismatch at load.
    retired = tuple(model_config.get("codebook_factors", ()))
    if retired:
        raise ConfigError(
            f"this dVAE was trained with model.codebook_factors={retired}, a product codebook this "
            f"version no longer builds"
        )
    fields = dict(
        vocab_size=int(model_config.vocab_size),
        hidden=int(model_config.hidden),
        width_multipliers=mults,
        blocks_per_group=int(model_config.blocks_per_group),
        decoder_init_channels=int(model_config.decoder_init_channels),
        input_channels=int(model_config.get("input_channels", 3)),
        dtype=dtype_of(compute_dtype),
        remat=remat,
        logit_init_scale=float(model_config.get("encoder_logit_init_scale", 1.0)),
        embed_init_std=float(model_config.get("decoder_embed_init_std", 0.0)),
        logit_norm=bool(model_config.get("encoder_logit_norm", False)),
    )
    return fields


def make_dvae(model_config, compute_dtype: str = "float32", remat: str = "none") -> DVAE:
    """OpenAI's dVAE with `config.model`'s sizes. A config that selects an experiment is built by
    dalle_jax.dvae_models.make_dvae, which this module cannot import (it builds on this one)."""
    if int(model_config.get("colour_codes", 0)):
        raise ConfigError(
            "model.colour_codes selects an experiment, which dalle_jax.dvae_models.make_dvae builds"
        )
    return DVAE(**dvae_fields(model_config, compute_dtype, remat))


def conv_flops(h, w, k, cin, cout):
    return 2 * h * w * k * k * cin * cout


def _blocks_flops(h, w, cin, cout, kernels, n_blocks, upsampled_input=False):
    total = 0
    for b in range(n_blocks):
        c_in = cin if b == 0 else cout
        hid = cout // 4
        # ResBlock.upsample_input: the input's 1x1 convs run before the x2 upsampling.
        low = 4 if (upsampled_input and b == 0) else 1
        if c_in != cout:
            total += conv_flops(h, w, 1, c_in, cout) // low
        widths = [c_in, hid, hid, hid, cout]
        for i, k in enumerate(kernels):
            scale = low if (i == 0 and k == 1) else 1
            total += conv_flops(h, w, k, widths[i], widths[i + 1]) // scale
    return total


def encoder_flops(model_config, image_size: int, input_channels=None, num_logits=None) -> int:
    """Encoder forward FLOPs for one image; `input_channels` / `num_logits` (default: the image's
    channels, vocab_size) are what the trunk reads and the logit conv writes."""
    hid, mults, nb = (
        int(model_config.hidden),
        list(model_config.width_multipliers),
        int(model_config.blocks_per_group),
    )
    if input_channels is None:
        input_channels = int(model_config.get("input_channels", 3))
    if num_logits is None:
        num_logits = int(model_config.vocab_size)
    s = image_size
    enc = conv_flops(s, s, 7, input_channels, hid)
    c = hid
    for g, m in enumerate(mults):
        enc += _blocks_flops(s, s, c, hid * m, ENCODER_KERNELS, nb)
        c = hid * m
        if g < len(mults) - 1:
            s //= 2
    return enc + conv_flops(s, s, 1, c, num_logits)


def decoder_flops(model_config, image_size: int, soft_codes: bool = True) -> int:
    """Decoder forward FLOPs for one image; with `soft_codes` its input is the vocab x
    init_channels matmul that training runs, else a lookup (free)."""
    hid, mults, nb = (
        int(model_config.hidden),
        list(model_config.width_multipliers),
        int(model_config.blocks_per_group),
    )
    vocab, init = int(model_config.vocab_size), int(model_config.decoder_init_channels)
    s = image_size // downsample_factor(model_config)
    dec = conv_flops(s, s, 1, vocab, init) if soft_codes else 0
    c = init
    for g, m in enumerate(reversed(mults)):
        dec += _blocks_flops(s, s, c, hid * m, DECODER_KERNELS, nb, upsampled_input=g > 0)
        c = hid * m
        if g < len(mults) - 1:
            s *= 2
    return dec + conv_flops(s, s, 1, c, 2 * int(model_config.get("input_channels", 3)))


def forward_flops(model_config, image_size: int, soft_codes: bool = True) -> tuple[int, int]:
    """(encoder, decoder) forward FLOPs of OpenAI's model for one image, counting multiply-adds
    as 2 (dalle_jax.dvae_models.forward_flops covers the experiments too)."""
    return encoder_flops(model_config, image_size), decoder_flops(model_config, image_size, soft_codes)


def default_model_config():
    """`config.model` for the dVAE with OpenAI's sizes and the paper's training schedules."""

    return ml_collections.ConfigDict(
        dict(
            vocab_size=8192,
            hidden=256,  # width of the first group; group g is hidden * multiplier
            width_multipliers=(1, 2, 4, 8),  # one per group; a 2x2 max-pool between encoder groups
            blocks_per_group=2,
            decoder_init_channels=128,  # the decoder's 1x1 conv from one-hot codes
            input_channels=3,
            # Init of the two layers around the codes; the defaults are OpenAI's fan-in init, under which
            # logits start ~0.1 (far below the gumbel noise) and small models take long to start using
            # their codes. Larger values only change the starting point, not the architecture.
            encoder_logit_init_scale=1.0,  # multiplies the encoder output conv's init
            decoder_embed_init_std=0.0,  # > 0: N(0, std) rows for the decoder's code embedding
            # Not in OpenAI's model (their weights have no such layer): LayerNorm on the encoder's last
            # features before the logit conv, against codebook collapse in small, short runs.
            encoder_logit_norm=False,
            # 0: OpenAI's model. > 0 selects the shapes suite's structure / colour split, an experiment
            # (dalle_jax/experiments/colour_split_dvae.py, built by dalle_jax/dvae_models.py).
            colour_codes=0,
            # Training objective (dalle_jax/dvae_loss.py).
            recon_loss="logit_laplace",  # logit_laplace | mse
            straight_through=False,  # hard one-hot forward, relaxed gradient
            straight_through_from_step=-1,  # >= 0: straight-through from this step on (-1: never)
            # What the decoder is trained on: "relaxed" (the gumbel-softmax sample, or straight-through
            # as set above) or "argmax" (the encoder's argmax codes, as at inference, with no gradient
            # to the encoder and no KL / usage terms): decoder fine-tuning of a trained dVAE with
            # --config.init_from=W --config.frozen=encoder, which leaves its tokens unchanged.
            train_codes="relaxed",
            temperature_start=1.0,
            temperature_end=1.0 / 16,
            temperature_anneal_steps=150_000,
            temperature_schedule="cosine",  # cosine | exponential | linear | constant
            kl_weight_start=0.0,
            kl_weight_end=6.6,
            kl_weight_ramp_steps=5000,
            kl_weight_schedule="cosine",
            usage_weight=0.0,  # > 0: also penalise log K - H(batch-average codes) (not in the paper)
            usage_weight_schedule="constant",  # constant: usage_weight throughout; else usage_weight ->
            usage_weight_end=0.0,  # usage_weight_end over usage_weight_steps
            usage_weight_steps=0,
            # Evaluation: batches of the eval split per evaluation (-1 = the whole split).
            eval_max_batches=-1,
        )
    )
