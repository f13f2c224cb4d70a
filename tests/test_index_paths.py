"""Index files cannot make a run read outside their folder: a folder-source row naming a file
elsewhere (absolute, `..` out, a URL, a symlink out) is a counted `unsafe_path` skip, and a token or
embedding shard index listing such a shard is one ConfigError naming the index and the entry. Every
test watches `open` and checks that no file outside the root was opened."""

import builtins
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from core_jax.data import default_data_config, make_iterator
from core_jax.data.embedding_shards import EmbeddingShardSource
from core_jax.data.index_paths import IndexRoot, UnsafePath
from core_jax.data.token_shards import TokenShardSource
from core_jax.errors import ConfigError
from tests.test_token_shards import write_shards


@pytest.fixture
def opened(monkeypatch):
    """The real path of every file opened by name while the test runs."""
    seen, real_open = [], builtins.open

    def spy(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            seen.append(os.path.realpath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)  # zipfile opens through io.open
    return seen


def _png(path, value):
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _outside(tmp_path):
    """A folder beside the root with a readable image in it: what an escaping entry would reach."""
    (tmp_path / "outside").mkdir()
    _png(tmp_path / "outside" / "secret.png", 200)
    return str(tmp_path / "outside")


def _keys(cfg):
    it = make_iterator(
        cfg,
        "train",
        global_batch_size=4,
        seed=0,
        example_fn=lambda raw, rng: {"key": np.array(raw["key"])},
        train=False,
        process_index=0,
        process_count=1,
    )
    return [str(k) for b in it for k, m in zip(b["key"], b["_mask"]) if m], dict(it.skipped)


def test_folder_rows_outside_the_index_folder_are_counted_skips(tmp_path, opened):
    outside = _outside(tmp_path)
    root = tmp_path / "data"
    (root / "imgs").mkdir(parents=True)
    for i in range(2):
        _png(root / "imgs" / f"{i}.png", 10 * i)
    os.symlink(os.path.join(outside, "secret.png"), root / "link.png")
    os.symlink(outside, root / "linkdir")
    os.symlink("imgs/0.png", root / "inner.png")  # a symlink that stays inside is fine
    safe = ["imgs/0.png", "imgs/../imgs/1.png", "inner.png"]
    unsafe = [
        "../outside/secret.png",
        "imgs/../../outside/secret.png",
        os.path.join(outside, "secret.png"),
        "file://" + os.path.join(outside, "secret.png"),
        "link.png",
        "linkdir/secret.png",
    ]
    with open(root / "index.jsonl", "w") as f:
        for name in safe + unsafe:
            f.write(json.dumps({"path": name, "caption": "c"}) + "\n")
    cfg = default_data_config()
    cfg.update(dict(source="folder", index_file=str(root / "index.jsonl")))
    del opened[:]  # from here on, only what the source opens
    keys, skipped = _keys(cfg)
    assert sorted(keys) == sorted(safe) and skipped == {"unsafe_path": len(unsafe)}
    assert not [p for p in opened if p.startswith(outside)], opened


def test_bucket_index_rows_cannot_climb_out_either(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(buf, "PNG")
    fs.pipe("/bucket-paths/folder/imgs/a.png", buf.getvalue())
    fs.pipe("/bucket-paths/outside/secret.png", buf.getvalue())
    rows = ["imgs/a.png", "../outside/secret.png", "/bucket-paths/outside/secret.png"]
    rows.append("memory://bucket-paths/outside/secret.png")
    fs.pipe("/bucket-paths/folder/index.csv", ("path,caption\n" + "".join(f"{r},c\n" for r in rows)).encode())
    cfg = default_data_config()
    cfg.update(dict(source="folder", index_file="memory://bucket-paths/folder/index.csv"))
    assert _keys(cfg) == (["imgs/a.png"], {"unsafe_path": 3})


@pytest.mark.parametrize("entry", ["../outside/x.npz", "ABS", "link.npz", "sub/../../outside/x.npz"])
def test_a_token_shard_outside_the_directory_is_one_config_error(tmp_path, opened, entry):
    outside = write_shards(tmp_path / "outside", splits=("train",), n=4)  # readable shards
    root = tmp_path / "tokens"
    write_shards(root, splits=("train",), n=4)
    os.symlink(os.path.join(outside, "train-00000.npz"), root / "link.npz")
    entry = os.path.join(outside, "train-00000.npz") if entry == "ABS" else entry
    index = json.loads((root / "index.json").read_text())
    index["splits"]["train"]["shards"].append(entry)
    (root / "index.json").write_text(json.dumps(index))
    del opened[:]
    with pytest.raises(ConfigError) as e:
        TokenShardSource(str(root), "train")
    message = str(e.value)
    assert str(root / "index.json") in message and repr(entry) in message and "\n" not in message
    assert not [p for p in opened if p.startswith(outside)], opened


def test_shard_symlinks_inside_the_directory_still_load(tmp_path):
    root = tmp_path / "tokens"
    write_shards(root, splits=("train",), n=4)
    os.rename(root / "train-00000.npz", root / "real.npz")
    os.symlink("real.npz", root / "train-00000.npz")
    assert len(TokenShardSource(str(root), "train")) == 4


def test_an_embedding_shard_outside_the_directory_is_one_config_error(tmp_path, opened):
    root = tmp_path / "emb"
    root.mkdir()
    secret = tmp_path / "secret.npz"
    np.savez(secret, image_embedding=np.zeros((1, 4), np.float32))
    index = {"clip_dim": 4, "text_length": 3, "splits": {"train": {"examples": 1, "shards": [str(secret)]}}}
    (root / "index.json").write_text(json.dumps(index))
    del opened[:]
    with pytest.raises(ConfigError, match="index.json.*is absolute"):
        EmbeddingShardSource(str(root), "train")
    assert str(secret) not in opened


def test_index_root_rules(tmp_path):
    root = IndexRoot(str(tmp_path))
    assert root.resolve("a/./b/../c.png") == os.path.join(os.path.realpath(tmp_path), "a", "c.png")
    for name in ("..", "a/../../b", "/etc/passwd", "s3://b/x"):
        with pytest.raises(UnsafePath):
            root.resolve(name)
    bucket = IndexRoot("gs://b/dir", remote=True)
    assert bucket.resolve("x/y.png") == "gs://b/dir/x/y.png"
    with pytest.raises(UnsafePath, match="climbs out"):
        bucket.resolve("x/../../y.png")
