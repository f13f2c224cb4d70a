"""`data.source='embeddings'`: pre-computed CLIP embedding shards (what
`dalle_jax.unclip.encode_embeddings` writes), so a diffusion prior trains without a CLIP image tower.

A directory D (`data.embeddings_dir`) holding D/index.json ({clip_dim, text_length, clip_workdir,
splits: {split: {examples, shards: [file, ...]}}}) and, per split, `<split>-NNNNN.npz` files with
`image_embedding` float32 [N, E] and `text_embedding` float32 [N, E] (L2-normalised CLIP
embeddings), `text` int32 [N, L] (the captions' CLIP tokens), `captions` and `keys` (unicode
arrays). Examples carry those arrays instead of an image. Rows are read from the files on demand
(token_shards' positioned reads), so host memory does not grow with the dataset.
"""

from __future__ import annotations

import json

import numpy as np

from core_jax import storage
from core_jax.data.token_shards import ShardRows

COLUMNS = ("image_embedding", "text_embedding", "text", "captions", "keys")
REQUIRED = COLUMNS[:4]
INDEX_FILE = "index.json"


def read_index(data_dir: str) -> dict:
    path = storage.join(data_dir, INDEX_FILE)
    if not storage.isfile(path):
        raise FileNotFoundError(
            f"data.embeddings_dir={data_dir!r} has no {INDEX_FILE} (write one with "
            "python -m dalle_jax.unclip.encode_embeddings --out_dir DIR)"
        )
    with storage.open(path) as f:
        try:
            index = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    for key in ("clip_dim", "text_length", "splits"):
        if key not in index:
            raise ValueError(f"{path}: missing {key!r}")
    return index


class EmbeddingShardSource(ShardRows):
    """Random access over one split of an embedding-shard directory."""

    COLUMNS, REQUIRED = COLUMNS, REQUIRED
    source, kind = "data.embeddings_dir", "embedding shard"

    def __init__(self, data_dir: str, split: str):
        index = read_index(data_dir)
        self.writer = f"encode_embeddings --split {split}"
        self.clip_dim, self.text_length = int(index["clip_dim"]), int(index["text_length"])
        super().__init__(data_dir, split, index, name=f"embeddings {data_dir} [{split}]")

    def check_shard(self, path, shard, columns):
        widths = {"image_embedding": self.clip_dim, "text_embedding": self.clip_dim, "text": self.text_length}
        for key, width in widths.items():
            if columns[key].shape[1:] != (width,):
                raise ValueError(
                    f"{path}: {key} rows are {columns[key].shape[1:]}, {INDEX_FILE} says ({width},)"
                )

    def load(self, i, rng):
        out = self.row(i)
        caption = str(out["captions"])
        key = str(out.get("keys", "")) or f"{int(i)}"
        return {
            "image_embedding": out["image_embedding"].astype(np.float32),
            "text_embedding": out["text_embedding"].astype(np.float32),
            "text_tokens": out["text"].astype(np.int32),
            "caption": caption,
            "captions": [caption] if caption else [],
            "label": -1,
            "key": key,
        }
