"""Inference with a trained (or converted) dVAE: images <-> tokens.

    vae = DVAE.load(workdir)
    tokens = vae.encode(images)   # uint8 [B,H,W,3] or float in [0,1] -> int32 [B, h, w]
    images = vae.decode(tokens)   # int [B, h, w] -> uint8 [B, H, W, 3]

`encode_fn` / `decode_fn` are the pure `(params, x)` functions, for use inside other jitted code
(the DALL-E trainer and sampler).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from core_jax import sharded_inference
from core_jax.checkpoint import read_config
from core_jax.data import image_ops
from dalle_jax import dvae as dvae_lib
from dalle_jax import dvae_loss, dvae_models


def check_dvae_workdir(workdir: str) -> None:
    """A ValueError unless `workdir`'s config.json describes a dVAE; reads no params."""
    config = read_config(workdir)
    if "model" not in config or "vocab_size" not in config.model or "width_multipliers" not in config.model:
        raise ValueError(f"{workdir} does not hold a dVAE (its config.json has no dVAE model keys)")


class DVAE:
    def __init__(self, config, params, compute_dtype: str | None = None, mesh=None):
        self.config = config
        self.params = params
        # None: the API runs on this process's device; a mesh: params sharded on it, rows split.
        self.mesh = mesh
        self.model = dvae_models.make_dvae(
            config.model, compute_dtype or config.get("compute_dtype", "float32")
        )
        self.image_size = int(config.data.image_size)
        self.grid_size = dvae_lib.grid_size(config.model, self.image_size)
        self.vocab_size = int(config.model.vocab_size)
        self.channels = int(config.model.get("input_channels", 3))
        self._encode = jax.jit(self.encode_fn)
        self._decode = jax.jit(self.decode_fn)

    @classmethod
    def load(
        cls,
        workdir: str,
        step: int | None = None,
        compute_dtype: str | None = None,
        *,
        raw_weights: bool = False,
        mesh=None,
    ) -> "DVAE":
        """The newest (or given) checkpoint of a dVAE workdir written by train_dvae or convert_dvae:
        its EMA weights when the run kept one (config.ema_decay > 0), else (or with `raw_weights`)
        its raw params. `mesh`: restored onto their training shardings there (None: one device)."""

        check_dvae_workdir(workdir)
        config = read_config(workdir)
        model = dvae_models.make_dvae(config.model, compute_dtype or config.get("compute_dtype", "float32"))
        size, channels = int(config.data.image_size), int(config.model.get("input_channels", 3))
        config, params = sharded_inference.load_params(
            workdir,
            lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)))["params"],
            mesh,
            step=step,
            ema=not raw_weights,
        )
        return cls(config, params, compute_dtype, mesh)

    def _run(self, fn, make_rows):
        # The rows are made on this process's device whatever mesh the caller has set (a trainer's
        # evaluator tokenizes under the training mesh, which spans other processes' devices).
        with jax.set_mesh(None):
            rows = make_rows()
        return sharded_inference.run(self.mesh, fn, self.params, rows)

    # -- pure functions -----------------------------------------------------------------------
    def encode_fn(self, params, images01):
        """float images in [0, 1] [B,H,W,C] -> int32 tokens [B, h, w] (argmax codes)."""
        x = image_ops.map_pixels(images01.astype(jnp.float32))
        logits = self.model.apply({"params": params}, x, method=dvae_lib.DVAE.encode)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def decode_fn(self, params, tokens):
        """int tokens [B, h, w] -> float images in [0, 1] [B, H, W, C]."""
        stats = self.model.apply({"params": params}, tokens.astype(jnp.int32), method=dvae_lib.DVAE.decode)
        return dvae_loss.reconstruct_pixels(stats, self.channels)

    # -- host API ----------------------------------------------------------------------------
    def _images01(self, images):
        dtype = images.dtype
        shape = tuple(images.shape)
        want = (self.image_size, self.image_size, self.channels)
        if len(shape) != 4 or shape[1:] != want:
            raise ValueError(
                f"encode expects images of shape [B, {want[0]}, {want[1]}, {want[2]}], got "
                f"{shape}; resize/crop first (core_jax.data.image_ops.resize_and_crop)"
            )
        if dtype == jnp.uint8:
            return jnp.asarray(images).astype(jnp.float32) / 255.0
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"encode expects uint8 or float images in [0, 1], got dtype {dtype}")
        if isinstance(images, np.ndarray) and images.size and (images.min() < 0 or images.max() > 1):
            raise ValueError(f"float images must lie in [0, 1], got range [{images.min()}, {images.max()}]")
        return jnp.asarray(images, jnp.float32)

    def encode(self, images) -> jax.Array:
        """uint8 [B,H,W,3] (or float in [0, 1]) -> int32 tokens [B, grid, grid]."""
        return self._run(self._encode, lambda: self._images01(images))

    def decode(self, tokens) -> jax.Array:
        """int tokens [B, grid, grid] -> uint8 images [B, H, W, 3]."""
        shape = tuple(tokens.shape)
        if len(shape) != 3 or shape[1:] != (self.grid_size, self.grid_size):
            raise ValueError(
                f"decode expects tokens of shape [B, {self.grid_size}, {self.grid_size}], got {shape}"
            )
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"decode expects integer tokens, got dtype {tokens.dtype}")
        if (
            isinstance(tokens, np.ndarray)
            and tokens.size
            and (tokens.min() < 0 or tokens.max() >= self.vocab_size)
        ):
            raise ValueError(
                f"tokens must lie in [0, {self.vocab_size}), got range [{tokens.min()}, {tokens.max()}]"
            )
        pixels01 = self._run(self._decode, lambda: jnp.asarray(tokens))
        with jax.set_mesh(None):
            return _to_uint8(pixels01)

    def reconstruct(self, images) -> jax.Array:
        return self.decode(self.encode(images))


@functools.partial(jax.jit)
def _to_uint8(x01):
    return jnp.round(jnp.clip(x01, 0.0, 1.0) * 255.0).astype(jnp.uint8)
