"""The dVAE's structure / colour split: a shapes-suite experiment, not part of any paper.

Each code is a pair of digits, (vocab_size // colour_codes structure values, colour_codes colour
values), code = structure * colour_codes + colour. The encoder's trunk (dalle_jax/dvae.py's stack,
its input conv from one channel) reads a hue-blind *structure view* of the image and gives the
structure logits; a small colour head gives the colour logits from each token cell's colours. A
code's logit is the sum of its digits' logits and its decoder embedding the sum of their rows, so
a colour-shape pair the training images never held is two trained digits the decoder can draw.

It helps where objects are flat colours on black (the shapes suite's held-out colour-shape pairs)
and is not expected to help on photographs. Selected by `model.colour_codes > 0` through
`dalle_jax.dvae_models`; configs/dvae_shapes.py uses it. Measurements:
docs/results.md#dvae-a-structure--colour-split-2026-12-01.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from core_jax.data.image_ops import map_pixels, unmap_pixels
from core_jax.errors import ConfigError
from core_jax.modeling import constrain
from dalle_jax import dvae

# The floor on [0, 1] brightness: below it a cell is dark, and the structure view stops dividing by
# its neighbourhood's brightness (see structure_view, ColourHead).
_STRUCTURE_FLOOR = 0.05
COLOUR_HIDDEN = 64  # the colour head's width


def factor_digits(factors: Sequence[int]) -> np.ndarray:
    """[vocab, len(factors)] int digits of every code in the mixed radix `factors` (first factor
    most significant): code i = ((d_0 * f_1) + d_1) * f_2 + ... ."""
    return np.stack(np.unravel_index(np.arange(math.prod(factors)), tuple(factors)), axis=-1)


def factor_rows(factors: Sequence[int]) -> np.ndarray:
    """[vocab, len(factors)]: for every code, its digits' rows in the `sum(factors)` per-digit
    logits / embedding rows (factor 0's values first, then factor 1's, ...)."""
    offsets = np.cumsum((0,) + tuple(factors)[:-1])
    return factor_digits(factors) + offsets


def colour_code_digits(vocab_size: int, colour_codes: int) -> tuple[int, int]:
    """The digits of a code: (vocab_size // colour_codes structure values, colour_codes colour
    values), checked."""
    colour_codes = int(colour_codes)
    if colour_codes < 2 or vocab_size % colour_codes or vocab_size // colour_codes < 2:
        raise ConfigError(
            f"model.colour_codes must be >= 2 and divide vocab_size={vocab_size} "
            f"into >= 2 structure codes, got {colour_codes}"
        )
    return (vocab_size // colour_codes, colour_codes)


def structure_view(pixels, window: int):
    """pixels [B, H, W, 3] in [0, 1] -> mapped [B, H, W, 1]: each pixel's brightest channel over the
    brightest in the window x window square around it. On solid colours this is blind to hue and
    to the colour's own brightness, so what the encoder reads from it is where things are."""
    value = jnp.max(pixels, axis=-1, keepdims=True)
    local = jax.lax.reduce_window(value, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, 1, 1, 1), "SAME")
    # The floor keeps near-black regions from being stretched into noise.
    return jax.lax.stop_gradient(map_pixels(value / jnp.maximum(local, _STRUCTURE_FLOOR)))


class ColourHead(nn.Module):
    """pixels [B, H, W, 3] in [0, 1] -> [B, H/cell, W/cell, colour_codes] logits from each token
    cell's per-channel maximum, raw and over its largest channel: what colour the cell holds and
    nothing of where in the cell it is. Colour value 0 is kept for dark cells (every channel under
    the floor) and only for them: otherwise a colour could share black's value, since the
    structure digit already tells an object's cells from the background, and then a held-out pair
    is a combination the decoder never saw (seen in shapes runs: red on both seeds)."""

    colour_codes: int
    cell: int
    hidden: int = COLOUR_HIDDEN

    @nn.compact
    def __call__(self, pixels):
        b, h, w, c = pixels.shape
        cells = pixels.reshape(b, h // self.cell, self.cell, w // self.cell, self.cell, c)
        peak = cells.max(axis=(2, 4))
        brightest = peak.max(-1, keepdims=True)
        hue = peak / jnp.maximum(brightest, _STRUCTURE_FLOOR)
        feats = nn.relu(
            dvae.Conv(self.hidden, 1, dtype=jnp.float32, name="hidden")(jnp.concatenate([peak, hue], axis=-1))
        )
        logits = dvae.Conv(self.colour_codes, 1, dtype=jnp.float32, name="output")(feats)
        dark = brightest < _STRUCTURE_FLOOR
        # A large finite value, not -inf: the KL and usage terms take q * log q of these.
        allowed = jnp.where(jnp.arange(self.colour_codes) == 0, dark, ~dark)
        return jnp.where(allowed, logits, -1e4)


class ColourSplitEncoder(dvae.Encoder):
    """The OpenAI trunk on the structure view gives the structure logits (`output`), the colour
    head (`colour`) the colour logits; a code's logit is the sum of its two digits' logits."""

    colour_codes: int = 7

    @nn.compact
    def __call__(self, x):
        digits = colour_code_digits(self.vocab_size, self.colour_codes)
        pixels = unmap_pixels(x)
        cell = 2 ** (len(self.width_multipliers) - 1)
        colour = ColourHead(self.colour_codes, cell, name="colour")(pixels)
        features = self.trunk(structure_view(pixels, 2 * cell + 1))
        parts = jnp.concatenate([self.logit_conv(features, digits[0]), colour], axis=-1)
        logits = jnp.take(parts, factor_rows(digits), axis=-1).sum(-1)
        return constrain(logits, dvae.LOGITS_ACT)


class ProductCodeEmbedding(dvae.CodeEmbedding):
    """A code's row is the sum of one row per digit (`sum(code_digits)` rows stored), so a code the
    training images never produced still has an embedding made of trained rows."""

    code_digits: Sequence[int] = ()

    def num_rows(self) -> int:
        return sum(self.code_digits)

    def code_kernel(self, kernel):
        return jnp.take(kernel, factor_rows(tuple(self.code_digits)), axis=2).sum(3)


class ProductDecoder(dvae.Decoder):
    code_digits: Sequence[int] = ()

    def code_embedding(self) -> ProductCodeEmbedding:
        return ProductCodeEmbedding(
            self.init_channels,
            self.vocab_size,
            self.dtype,
            self.embed_init_std,
            tuple(self.code_digits),
            name="input",
        )


class ColourSplitDVAE(dvae.DVAE):
    colour_codes: int = 7

    def make_encoder(self, **fields) -> ColourSplitEncoder:
        return ColourSplitEncoder(**fields, colour_codes=self.colour_codes)

    def make_decoder(self, **fields) -> ProductDecoder:
        return ProductDecoder(**fields, code_digits=colour_code_digits(self.vocab_size, self.colour_codes))


def make_dvae(model_config, **fields) -> ColourSplitDVAE:
    """`dalle_jax.dvae.make_dvae`'s DVAE fields -> the split model, its config checked first."""
    colour_codes = int(model_config.colour_codes)
    colour_code_digits(int(model_config.vocab_size), colour_codes)
    if fields["input_channels"] != 3:
        raise ConfigError("model.colour_codes needs RGB inputs (model.input_channels=3)")
    return ColourSplitDVAE(**fields, colour_codes=colour_codes)


def forward_flops(model_config, image_size: int, soft_codes: bool = True) -> tuple[int, int]:
    """`dalle_jax.dvae.forward_flops` of the split model: the trunk reads one channel and writes the
    structure logits (the sum over digits is free), and the colour head runs once per token cell."""
    structure, colour = colour_code_digits(int(model_config.vocab_size), int(model_config.colour_codes))
    enc = dvae.encoder_flops(model_config, image_size, input_channels=1, num_logits=structure)
    cells = image_size // dvae.downsample_factor(model_config)
    enc += dvae.conv_flops(cells, cells, 1, 6, COLOUR_HIDDEN) + dvae.conv_flops(
        cells, cells, 1, COLOUR_HIDDEN, colour
    )
    return enc, dvae.decoder_flops(model_config, image_size, soft_codes)


def eval_metrics(model_config, histogram: np.ndarray) -> dict[str, float]:
    """`codebook_rows_used_fraction`: the fraction of digit rows some used code is made of. The data
    need not hold every combination of digits (on the shapes suite no dark cell holds an object's
    outline), so a dead row is what collapse looks like here."""
    digits = colour_code_digits(int(model_config.vocab_size), int(model_config.colour_codes))
    rows = np.unique(factor_rows(digits)[np.asarray(histogram) > 0])
    return {"codebook_rows_used_fraction": rows.size / sum(digits)}
