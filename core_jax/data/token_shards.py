"""`data.source='tokens'`: pre-encoded image-token shards (what `dalle_jax.encode_dataset` writes).

A directory D (`data.data_dir`) holding D/index.json and, per split, `<split>-NNNNN.npz` files with
`tokens` int [N, grid, grid] (or [N, grid*grid]), `captions` and `keys` (unicode arrays). Examples
carry `image_tokens` instead of an image, so a transformer trains without running an image encoder.
A split's tokens are read into host memory once (int16 when the codebook allows: 1024 tokens are
2 KiB per image) and served by index like any random-access source.
"""
from __future__ import annotations

import json
import os

import numpy as np

from core_jax.data.decode import SkipExample


def read_index(data_dir: str) -> dict:
    path = os.path.join(data_dir, "index.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.source='tokens': no index.json in data.data_dir={data_dir!r} "
                                f"(write one with python -m dalle_jax.encode_dataset --out_dir DIR)")
    with open(path) as f:
        try:
            index = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    for key in ("grid_size", "vocab_size", "splits"):
        if key not in index:
            raise ValueError(f"{path}: missing {key!r}")
    return index


class TokenShardSource:
    """Random access over one split of a token-shard directory."""

    def __init__(self, data_dir: str, split: str):
        index = read_index(data_dir)
        if split not in index["splits"]:
            raise ValueError(f"data.source='tokens': split {split!r} is not in {data_dir}/index.json "
                             f"(it has {sorted(index['splits'])}); encode it with encode_dataset --splits")
        self.name = f"tokens {data_dir} [{split}]"
        self.grid_size, self.vocab_size = int(index["grid_size"]), int(index["vocab_size"])
        dtype = np.int16 if self.vocab_size <= np.iinfo(np.int16).max + 1 else np.int32
        tokens, captions, keys = [], [], []
        for name in index["splits"][split]["shards"]:
            path = os.path.join(data_dir, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{data_dir}/index.json lists {name}, which does not exist")
            with np.load(path, allow_pickle=False) as shard:
                t = shard["tokens"]
                tokens.append(t.reshape(len(t), -1).astype(dtype))
                captions.append(shard["captions"])
                keys.append(shard["keys"] if "keys" in shard else np.full(len(t), "", dtype=str))
        if not tokens:
            raise ValueError(f"data.source='tokens': split {split!r} of {data_dir} has no shards")
        self._tokens = np.concatenate(tokens)
        self._captions = np.concatenate(captions)
        self._keys = np.concatenate(keys)
        expected = self.grid_size * self.grid_size
        if self._tokens.shape[1] != expected:
            raise ValueError(f"{self.name}: shards hold {self._tokens.shape[1]} tokens per image, "
                             f"index.json says a {self.grid_size}x{self.grid_size} grid")

    def __len__(self):
        return len(self._tokens)

    def __getitem__(self, i):
        return self.load(i, None)

    def load(self, i, rng):
        i = int(i)
        caption = str(self._captions[i])
        key = str(self._keys[i]) or f"{i}"
        tokens = self._tokens[i].astype(np.int32)
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise SkipExample("bad_tokens", key)
        return {"image_tokens": tokens, "caption": caption, "captions": [caption] if caption else [],
                "label": -1, "key": key}
