"""encode_dataset shared by several processes: each encodes its own part of a split, and the joined
index reads back every example exactly once, its tokens beside its own caption.

The processes run one after the other here (what each one does depends only on its index), with a
stand-in encoder whose tokens are the image's brightness, so they can be checked against the
caption that names it."""

import json
import os

import numpy as np

from core_jax.data.config import default_data_config
from core_jax.data.token_shards import TokenShardSource
from dalle_jax import encode_dataset
from tests.testfiles import encode_image, write_tar

EXAMPLES, PROCESSES = 11, 2


class BrightnessEncoder:
    image_size, grid_size, vocab_size = 8, 2, 256

    def encode(self, images):
        level = np.round(np.asarray(images).mean(axis=(1, 2, 3)) * 255).astype(np.int32)
        return np.broadcast_to(level[:, None, None], (len(level), 2, 2))


def test_processes_encode_disjoint_parts_that_join_into_one_index(tmp_path):
    for shard, levels in enumerate((range(0, 6), range(6, EXAMPLES))):
        members = []
        for level in levels:
            members.append((f"{level:03d}.png", encode_image(np.full((8, 8, 3), 10 * level, np.uint8))))
            members.append((f"{level:03d}.txt", f"level {10 * level}".encode()))
        write_tar(tmp_path / f"s{shard}.tar", members)
    data = default_data_config()
    data.source, data.urls, data.min_image_side = "webdataset", str(tmp_path / "s{0,1}.tar"), 1
    out = tmp_path / "tokens"
    out.mkdir()
    header = {"grid_size": 2, "vocab_size": 256, "image_size": 8, "dvae_workdir": "w"}
    for p in range(PROCESSES):
        part = encode_dataset.encode_split(
            BrightnessEncoder(),
            data,
            "train",
            str(out),
            shard_size=2,
            batch_size=2,
            log=lambda m: None,
            process_index=p,
            process_count=PROCESSES,
        )
        assert part["shards"] and all(s.startswith(f"train-p{p:04d}-") for s in part["shards"])
        assert 0 < part["examples"] < EXAMPLES
        with open(out / encode_dataset.part_index_name(p), "w") as f:
            json.dump(dict(header, splits={"train": part}), f)

    index = encode_dataset.merge_part_indexes(str(out), PROCESSES)
    assert {k: index[k] for k in header} == header
    assert index["splits"]["train"]["examples"] == EXAMPLES
    with open(out / "index.json", "w") as f:
        json.dump(index, f)
    source = TokenShardSource(str(out), "train")
    rows = [source.load(i, None) for i in range(len(source))]
    assert sorted(r["caption"] for r in rows) == sorted(f"level {10 * k}" for k in range(EXAMPLES))
    for row in rows:
        assert f"level {int(row['image_tokens'][0])}" == row["caption"]
    assert len(os.listdir(out)) == len(index["splits"]["train"]["shards"]) + PROCESSES + 1
