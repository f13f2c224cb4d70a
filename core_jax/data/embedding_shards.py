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
import os
import zipfile

import numpy as np

from core_jax.data.decode import SkipExample
from core_jax.data.token_shards import _open_columns

COLUMNS = ("image_embedding", "text_embedding", "text", "captions", "keys")
REQUIRED = COLUMNS[:4]
INDEX_FILE = "index.json"


def read_index(data_dir: str) -> dict:
    path = os.path.join(data_dir, INDEX_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"data.embeddings_dir={data_dir!r} has no {INDEX_FILE} (write one with "
            "python -m dalle_jax.unclip.encode_embeddings --out_dir DIR)"
        )
    with open(path) as f:
        try:
            index = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    for key in ("clip_dim", "text_length", "splits"):
        if key not in index:
            raise ValueError(f"{path}: missing {key!r}")
    return index


class EmbeddingShardSource:
    """Random access over one split of an embedding-shard directory."""

    def __init__(self, data_dir: str, split: str):
        index = read_index(data_dir)
        if split not in index["splits"]:
            raise ValueError(
                f"data.embeddings_dir: split {split!r} is not in {data_dir}/{INDEX_FILE} "
                f"(it has {sorted(index['splits'])}); encode it with encode_embeddings --split {split}"
            )
        self.name = f"embeddings {data_dir} [{split}]"
        self.clip_dim, self.text_length = int(index["clip_dim"]), int(index["text_length"])
        widths = {"image_embedding": self.clip_dim, "text_embedding": self.clip_dim, "text": self.text_length}
        self._paths, self._columns, counts = [], [], []
        for name in index["splits"][split]["shards"]:
            path = os.path.join(data_dir, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{data_dir}/{INDEX_FILE} lists {name}, which does not exist")
            try:
                columns = _open_columns(path, COLUMNS)
            except (zipfile.BadZipFile, ValueError, OSError) as e:
                raise ValueError(f"{path}: not a readable embedding shard ({e})") from None
            missing = [key for key in REQUIRED if key not in columns]
            if missing:
                raise ValueError(
                    f"{path}: no {', '.join(missing)} (encode_embeddings writes {', '.join(COLUMNS)})"
                )
            for key, width in widths.items():
                if columns[key].shape[1:] != (width,):
                    raise ValueError(
                        f"{path}: {key} rows are {columns[key].shape[1:]}, {INDEX_FILE} says ({width},)"
                    )
            n = columns["image_embedding"].shape[0]
            if any(c.shape[0] != n for c in columns.values()):
                raise ValueError(f"{path}: its arrays differ in length")
            self._paths.append(path)
            self._columns.append(columns)
            counts.append(n)
        if not self._paths:
            raise ValueError(f"data.embeddings_dir: split {split!r} of {data_dir} has no shards")
        self._starts = np.concatenate([[0], np.cumsum(counts)])

    def __len__(self):
        return int(self._starts[-1])

    def __getitem__(self, i):
        return self.load(i, None)

    def load(self, i, rng):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.name}: index {i} out of range for {len(self)} examples")
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        row, columns = i - int(self._starts[shard]), self._columns[shard]
        try:
            with open(self._paths[shard], "rb") as f:
                fd = f.fileno()
                out = {key: columns[key].row(fd, row) for key in columns}
        except OSError as e:  # a shard deleted or cut short while the run reads it
            raise SkipExample("unreadable_shard", f"{self._paths[shard]}: {e}") from None
        caption = str(out["captions"])
        key = str(out.get("keys", "")) or f"{i}"
        return {
            "image_embedding": out["image_embedding"].astype(np.float32),
            "text_embedding": out["text_embedding"].astype(np.float32),
            "text_tokens": out["text"].astype(np.int32),
            "caption": caption,
            "captions": [caption] if caption else [],
            "label": -1,
            "key": key,
        }
