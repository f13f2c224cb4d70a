"""`data.source='tokens'`: the DALL-E transformer trains on pre-encoded token shards (the format
dalle_jax.encode_dataset writes), without running a dVAE encoder."""

import json
import math
import os

import numpy as np
import pytest

from core_jax.config import ConfigError
from core_jax.data import make_iterator
from core_jax.data.token_shards import TokenShardSource
from dalle_jax import dalle_task
from tests.testfiles import load_config

GRID, CODES = 4, 16
CAPTIONS = [
    "a red circle in the top left",
    "a blue square in the center",
    "a green triangle to the left of a white circle",
]


def write_shards(
    root,
    splits=("train", "test_unseen"),
    n=20,
    shard_size=8,
    grid=GRID,
    codes=CODES,
    dvae_workdir="",
    save=np.savez,
):
    """Shards exactly as encode_dataset writes them; tokens[i] = (i + position) % codes."""
    root.mkdir(exist_ok=True)
    index = {
        "grid_size": grid,
        "vocab_size": codes,
        "image_size": 16,
        "dvae_workdir": dvae_workdir,
        "splits": {},
    }
    for split in splits:
        names = []
        for start in range(0, n, shard_size):
            ids = np.arange(start, min(n, start + shard_size))
            tokens = (ids[:, None] + np.arange(grid * grid)[None]) % codes
            names.append(f"{split}-{len(names):05d}.npz")
            save(
                root / names[-1],
                tokens=tokens.reshape(-1, grid, grid).astype(np.int32),
                captions=np.asarray([CAPTIONS[i % 3] for i in ids], dtype=str),
                keys=np.asarray([f"{split}/{i}" for i in ids], dtype=str),
            )
        index["splits"][split] = {"examples": n, "shards": names}
    (root / "index.json").write_text(json.dumps(index))
    return str(root)


def test_source_reads_every_example_across_shards(tmp_path):
    src = TokenShardSource(write_shards(tmp_path / "tok"), "train")
    assert len(src) == 20
    ex = src.load(13, None)
    np.testing.assert_array_equal(ex["image_tokens"], (13 + np.arange(16)) % CODES)
    assert ex["caption"] == CAPTIONS[13 % 3] and ex["key"] == "train/13" and "image" not in ex


def test_source_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no index.json"):
        TokenShardSource(str(tmp_path), "train")
    d = write_shards(tmp_path / "tok", splits=("train",))
    with pytest.raises(ValueError, match="split 'test_seen' is not in"):
        TokenShardSource(d, "test_seen")
    os.remove(os.path.join(d, "train-00001.npz"))
    with pytest.raises(FileNotFoundError, match="train-00001.npz, which does not exist"):
        TokenShardSource(d, "train")


def test_examples_are_read_from_the_files_not_held_in_memory(tmp_path):
    d = write_shards(tmp_path / "tok", splits=("train",))
    src = TokenShardSource(d, "train")
    # Rewrite example 13's tokens on disk after the split is open: the source serves the new ones.
    path = os.path.join(d, "train-00001.npz")
    raw = bytearray(open(path, "rb").read())
    old = ((13 + np.arange(16)) % CODES).astype(np.int32).tobytes()
    new = np.full(16, 7, np.int32).tobytes()
    assert raw.count(old) == 1
    open(path, "wb").write(bytes(raw).replace(old, new))
    np.testing.assert_array_equal(src.load(13, None)["image_tokens"], np.full(16, 7))
    np.testing.assert_array_equal(src.load(12, None)["image_tokens"], (12 + np.arange(16)) % CODES)


def test_compressed_shards_read_the_same(tmp_path):
    plain = TokenShardSource(write_shards(tmp_path / "a", splits=("train",)), "train")
    packed = TokenShardSource(
        write_shards(tmp_path / "b", splits=("train",), save=np.savez_compressed), "train"
    )
    for i in range(20):
        a, b = plain.load(i, None), packed.load(i, None)
        np.testing.assert_array_equal(a["image_tokens"], b["image_tokens"])
        assert (a["caption"], a["key"]) == (b["caption"], b["key"])


def test_many_shards_read_concurrently(tmp_path, monkeypatch):
    """More shards than open files, read by a thread pool in shuffled order: every example right."""
    import concurrent.futures

    from core_jax.data import token_shards

    monkeypatch.setattr(token_shards, "_OPEN_FILES", 3)
    src = TokenShardSource(write_shards(tmp_path / "tok", splits=("train",), n=200, shard_size=7), "train")
    assert len(src) == 200
    order = np.random.default_rng(0).permutation(np.tile(np.arange(200), 3))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: src.load(i, None), order))
    for i, ex in zip(order, got):
        np.testing.assert_array_equal(ex["image_tokens"], (i + np.arange(16)) % CODES)
        assert ex["key"] == f"train/{i}" and ex["caption"] == CAPTIONS[i % 3]
    assert len(src._files) <= 3


def test_damaged_shards_are_named(tmp_path):
    d = write_shards(tmp_path / "tok", splits=("train",))
    open(os.path.join(d, "train-00002.npz"), "wb").write(b"not a zip file")
    with pytest.raises(ValueError, match="train-00002.npz: not a readable token shard"):
        TokenShardSource(d, "train")
    np.savez(os.path.join(d, "train-00002.npz"), tokens=np.zeros((4, GRID, GRID), np.int32))
    with pytest.raises(ValueError, match="train-00002.npz: no 'captions' array"):
        TokenShardSource(d, "train")
    np.savez(
        os.path.join(d, "train-00002.npz"),
        tokens=np.zeros((4, 3, 3), np.int32),
        captions=np.asarray(["a"] * 4),
    )
    with pytest.raises(ValueError, match="holds 9 tokens per image, index.json says a 4x4 grid"):
        TokenShardSource(d, "train")


def dalle_config(data_dir):
    config = load_config("dalle_shapes")
    m = config.model
    m.image_grid, m.image_vocab_size = GRID, CODES
    m.d_model, m.num_heads, m.head_dim, m.num_layers, m.mlp_dim = 32, 2, 16, 2, 64
    m.eval_max_batches = 1
    config.batch_size, config.total_steps, config.log_every = 8, 3, 1
    config.eval_every = config.checkpoint_every = 2
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    # A schedule that does not follow total_steps: resumed to more steps, the run compiles the
    # program it already has (tests/compile_memo.py).
    config.optim.warmup_steps, config.optim.decay_steps = 1, 10
    config.data.source, config.data.data_dir = "tokens", data_dir
    config.text.train_source = "shapes"  # the shards hold shapes captions
    return config


def test_dalle_trains_on_token_shards_and_resumes(tmp_path):
    from core_jax import trainer

    # No dVAE anywhere (index.json names none): an example without tokens would fail the run.
    config = dalle_config(write_shards(tmp_path / "tok"))
    config.total_steps = 2
    workdir = str(tmp_path / "run")
    trainer.train(config, workdir, dalle_task.make_task(config, workdir), log_fn=lambda s: None)
    config.total_steps = 3  # resumes from the step-2 checkpoint with the iterator's position
    trainer.train(config, workdir, dalle_task.make_task(config, workdir), log_fn=lambda s: None)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in train)
    assert any("eval/" in k for r in rows for k in r)  # the eval split came from the shards too


def test_token_batches_are_the_shards_tokens(tmp_path):
    config = dalle_config(write_shards(tmp_path / "tok", n=CODES))  # first token = example index
    task = dalle_task.make_task(config, str(tmp_path / "run"))
    it = make_iterator(
        config.data,
        "train",
        global_batch_size=8,
        seed=0,
        example_fn=task.example_fn,
        train=True,
        process_index=0,
        process_count=1,
    )
    batch = next(iter(it))
    first = batch["image_tokens"][:, 0]
    np.testing.assert_array_equal(batch["image_tokens"], (first[:, None] + np.arange(16)) % CODES)
    assert len(set(first.tolist())) == 8  # eight distinct examples


def test_shards_of_another_grid_or_codebook_are_refused(tmp_path):
    config = dalle_config(write_shards(tmp_path / "tok", codes=32))
    with pytest.raises(ConfigError, match="4x4 tokens of a 32-code dVAE; the model expects 4x4 and 16"):
        dalle_task.make_task(config, str(tmp_path / "run"))


def test_index_names_the_dvae_for_samples(tmp_path, monkeypatch):
    from dalle_jax import run_config

    config = dalle_config(write_shards(tmp_path / "tok", dvae_workdir="/models/dvae"))
    loaded = []
    monkeypatch.setattr(run_config, "load_dvae", lambda workdir, cfg: loaded.append(workdir))
    task = dalle_task.make_task(config, str(tmp_path / "run"))
    assert task.config.dvae_workdir == "/models/dvae" and loaded == ["/models/dvae"]
    assert config.dvae_workdir == ""  # the config passed in is left as it was
