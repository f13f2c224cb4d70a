"""CLIP reranking of generated samples: score = cosine(image embedding, prompt embedding).

    clip = CLIPModel.load(clip_workdir)
    scores = clip_scores(clip, images, prompt)          # [N]
    order = rank(scores)[:k]                             # best first

`CLIPModel` (clip_jax/api.py) returns L2-normalised embeddings, so the dot product is the cosine.
For many prompts at once, `group_scores` embeds every image and every prompt once.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def clip_scores(clip, images: np.ndarray, prompt: str, batch_size: int = 64) -> np.ndarray:
    """float32 [N]: cosine similarity of each uint8 image [N, H, W, 3] with `prompt`."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("CLIP reranking needs a non-empty prompt")
    return group_scores(clip, np.asarray(images)[None], [prompt], batch_size)[0]


def group_scores(clip, images: np.ndarray, prompts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """float32 [P, S]: images uint8 [P, S, H, W, 3] scored against prompt p of their group."""
    images = np.asarray(images)
    if images.ndim != 5 or len(images) != len(prompts):
        raise ValueError(f"expected images [P, S, H, W, 3] for {len(prompts)} prompts, got {images.shape}")
    p, s = images.shape[:2]
    image_emb = clip.embed_images(images.reshape((p * s,) + images.shape[2:]), batch_size=batch_size)
    text_emb = clip.embed_texts(list(prompts))
    return np.einsum("pse,pe->ps", image_emb.reshape(p, s, -1), text_emb).astype(np.float32)


def rank(scores: np.ndarray) -> np.ndarray:
    """Indices of `scores` [N], highest first; equal scores keep sample order (stable)."""
    return np.argsort(-np.asarray(scores, np.float64), kind="stable")


def best_index(scores: np.ndarray) -> np.ndarray:
    """Index of the best sample of every group: scores [P, S] -> int [P] (first on ties)."""
    return np.argmax(np.asarray(scores), axis=-1)
