"""Load a CLIP workdir (trained or converted) for inference: on one device, or sharded on a mesh
(`mesh=`, see core_jax.sharded_inference) across the devices of one or several hosts.

clip = CLIPModel.load("/tmp/clip_shapes")
image_emb = clip.embed_images(images_uint8)        # [N, E], L2-normalised
text_emb = clip.embed_texts(["a red circle in the center"])
logits = clip.logit_scale() * image_emb @ text_emb.T
"""

from __future__ import annotations

import jax
import numpy as np

from clip_jax import clip_models
from clip_jax import model as clip_model
from clip_jax.task import make_tokenizer
from core_jax import sharded_inference
from core_jax.checkpoint import read_config
from core_jax.data.image_ops import clip_normalize, resize_and_crop
from core_jax.workdir_kinds import describe_workdir


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if len(x) == rows:
        return x
    return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)])


CLIP_TASK = "clip_jax.task"


def read_clip_config(workdir: str):
    """The config.json of a CLIP workdir; a ValueError naming the task when the workdir holds
    another model (a DALL-E, a dVAE or an unCLIP stage), before its params are read as CLIP's."""
    config = read_config(workdir)
    task = str(config.get("task", "") or "")
    if task != CLIP_TASK:
        raise ValueError(f"{workdir} is not a CLIP workdir (it is {describe_workdir(task)})")
    return config


class CLIPModel:
    """Params + tokenizer of one workdir, with jitted encoders (one compile per batch size).
    With a `mesh` the params are sharded on it and every batch is split over its (data, fsdp)
    axes; every process passes the same rows and gets all embeddings back."""

    def __init__(self, config, params, tokenizer, mesh=None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.module = clip_models.clip_from_config(config)
        self.image_size = int(config.model.image_size)
        self.embed_dim = int(config.model.embed_dim)
        self._image_fn = jax.jit(lambda p, x: clip_model.encode_image(self.module, p, x))
        self._text_fn = jax.jit(lambda p, t: clip_model.encode_text(self.module, p, t))

    @classmethod
    def load(
        cls, workdir: str, step: int | None = None, *, raw_weights: bool = False, mesh=None
    ) -> "CLIPModel":
        """The newest (or given) checkpoint of `workdir` and the tokenizer it was trained with; its
        EMA weights when the run kept one, else (or with `raw_weights`) its raw params. `mesh`:
        the params are restored onto their training shardings there (None: one device)."""

        config = read_clip_config(workdir)
        module = clip_models.clip_from_config(config)
        config, params = sharded_inference.load_params(
            workdir,
            lambda: clip_model.init_params(module, jax.random.key(0)),
            mesh,
            step=step,
            ema=not raw_weights,
        )
        return cls(config, params, make_tokenizer(config, workdir), mesh)

    def _run(self, fn, rows: np.ndarray) -> np.ndarray:
        return np.asarray(sharded_inference.run(self.mesh, fn, self.params, rows))

    def _chunk(self, batch_size: int, n: int) -> int:
        return sharded_inference.pad_rows(self.mesh, min(batch_size, n))

    def preprocess_images(self, images_uint8: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] (or a list of [H, W, 3]) -> CLIP-normalised float32 [N, S, S, 3].

        Images already S x S are only normalised; others get a shorter-side bicubic resize and a
        centre crop, as OpenAI's preprocessing.
        """

        if isinstance(images_uint8, np.ndarray) and images_uint8.ndim == 3:
            raise ValueError(f"preprocess_images: expected a batch [N, H, W, 3], got {images_uint8.shape}")
        out = np.empty((len(images_uint8), self.image_size, self.image_size, 3), np.float32)
        for i, image in enumerate(images_uint8):
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(
                    f"preprocess_images: image {i} must be uint8 [H, W, 3], got {image.dtype} {image.shape}"
                )
            out[i] = clip_normalize(resize_and_crop(image, self.image_size))
        return out

    def embed_images(self, images_uint8, batch_size: int = 64) -> np.ndarray:
        """L2-normalised image embeddings [N, E] (float32)."""
        n = len(images_uint8)
        out = np.zeros((n, self.embed_dim), np.float32)
        for start in range(0, n, batch_size):
            chunk = self.preprocess_images(images_uint8[start : start + batch_size])
            # Padding the last chunk keeps one compiled shape per batch size.
            emb = self._run(self._image_fn, _pad_rows(chunk, self._chunk(batch_size, n)))
            out[start : start + len(chunk)] = emb[: len(chunk)]
        return out

    def embed_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """L2-normalised text embeddings [N, E] (float32)."""
        if isinstance(texts, str):
            raise ValueError("embed_texts: expected a list of strings, got one str")
        texts = list(texts)
        n = len(texts)
        out = np.zeros((n, self.embed_dim), np.float32)
        for start in range(0, n, batch_size):
            tokens = np.asarray(self.tokenizer.encode(texts[start : start + batch_size]), np.int32)
            emb = self._run(self._text_fn, _pad_rows(tokens, self._chunk(batch_size, n)))
            out[start : start + len(tokens)] = emb[: len(tokens)]
        return out

    def logit_scale(self) -> float:
        """The learned temperature exp(logit_scale), clamped at 100 as in training."""
        return float(clip_model.logit_scale(self.module, self.params))
