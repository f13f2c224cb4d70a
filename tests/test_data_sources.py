"""Each source through make_iterator, on small files the tests write (no network, no TensorFlow)."""

import json

import numpy as np
import pytest

from core_jax.data import default_data_config, image_ops, make_iterator, sources
from tests.testfiles import encode_image as encode, write_tar


def image(i, h=32, w=32):
    return np.full((h, w, 3), i, np.uint8)  # value = index, so rows can be traced back


def write_shards(root, n_shards, per_shard):
    """img2dataset layout: KEY.jpg|png + KEY.txt or KEY.json, keys 000000000 ... in order."""
    i = 0
    for s in range(n_shards):
        items = []
        for _ in range(per_shard):
            key = f"{i:09d}"
            items.append((f"{key}.png", encode(image(i))))
            if i % 2:
                items.append((f"{key}.json", json.dumps({"caption": f"cap {i}", "label": i}).encode()))
            else:
                items.append((f"{key}.txt", f"cap {i}".encode()))
            i += 1
        write_tar(root / f"shard-{s:05d}.tar", items)


def fn(raw, rng):
    return {
        "id": np.int32(raw["image"][0, 0, 0]),
        "caption": np.array(raw["caption"]),
        "noise": np.float32(rng.random()),
    }


def cfg_for(**kw):
    cfg = default_data_config()
    cfg.update(kw)
    return cfg


def ids(batches, masked=False):
    return [i for b in batches for i, m in zip(b["id"].tolist(), b.get("_mask", [True] * 99)) if m]


def test_webdataset_patterns_and_captions(tmp_path):
    write_shards(tmp_path, 2, 8)
    cfg = cfg_for(source="webdataset", urls=f"{tmp_path}/shard-{{00000..00001}}.tar")
    it = make_iterator(
        cfg,
        "train",
        global_batch_size=8,
        seed=0,
        example_fn=fn,
        train=False,
        process_index=0,
        process_count=1,
    )
    batches = list(it)
    assert ids(batches) == list(range(16))  # eval: file order, no shuffle
    assert [c for b in batches for c in b["caption"].tolist()] == [f"cap {i}" for i in range(16)]
    for urls in (
        f"{tmp_path}/shard-*.tar",
        f"{tmp_path}/shard-00000.tar, {tmp_path}/shard-00001.tar",
        f"{tmp_path}/shard-0000{{0,1}}.tar",
    ):
        it = make_iterator(
            cfg_for(source="webdataset", urls=urls),
            "x",
            global_batch_size=16,
            seed=0,
            example_fn=fn,
            train=False,
            process_index=0,
            process_count=1,
        )
        assert sorted(ids(it)) == list(range(16))


def test_webdataset_train_shards_by_file_and_resumes_exactly(tmp_path):
    write_shards(tmp_path, 4, 6)
    cfg = cfg_for(source="webdataset", urls=f"{tmp_path}/shard-{{00000..00003}}.tar", shuffle_buffer=4)
    kw = dict(global_batch_size=6, seed=9, example_fn=fn, process_count=2)
    per_proc = []
    for p in range(2):
        it = make_iterator(cfg, "train", process_index=p, **kw)
        epoch = ids([next(it) for _ in range(4)])  # 12 records = this process's 2 shards
        assert sorted(epoch) == sorted(i for s in range(p, 4, 2) for i in range(6 * s, 6 * s + 6))
        assert epoch != sorted(epoch)  # shuffled
        per_proc.append(epoch)
    # Exact resume mid-window, with and without workers.
    for workers in (0, 2):
        cfg.num_workers = workers
        it = make_iterator(cfg, "train", process_index=1, **kw)
        for _ in range(3):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        want = [next(it) for _ in range(5)]
        cfg.num_workers = 2 - workers
        again = make_iterator(cfg, "train", process_index=1, **kw)
        again.set_state(state)
        for w in want:
            g = next(again)
            assert all(np.array_equal(g[k], w[k]) for k in w)
        again.close()
        it.close()
    cfg.num_workers = 0
    with pytest.raises(ValueError, match="at least one"):
        make_iterator(
            cfg, "train", global_batch_size=5, seed=0, example_fn=fn, process_index=4, process_count=5
        )


def test_webdataset_eval_every_example_once_across_processes(tmp_path):
    write_shards(tmp_path, 3, 5)
    cfg = cfg_for(source="webdataset", urls=f"{tmp_path}/shard-{{00000..00002}}.tar")
    seen, n_batches = [], set()
    for p in range(2):
        batches = list(
            make_iterator(
                cfg,
                "test",
                global_batch_size=8,
                seed=0,
                example_fn=fn,
                train=False,
                process_index=p,
                process_count=2,
            )
        )
        n_batches.add(len(batches))
        seen += ids(batches)
    assert n_batches == {3} and sorted(seen) == list(range(15))


def folder(tmp_path, n=6):
    (tmp_path / "imgs").mkdir()
    for i in range(n):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(encode(image(i)))
    return [
        {"path": f"imgs/{i}.png", "caption": f"cap {i}", "split": "train" if i < 4 else "val"}
        for i in range(n)
    ]


def test_folder_index_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = folder(tmp_path)
    (tmp_path / "index.csv").write_text(
        "file,text\n" + "".join(f"{r['path']},{r['caption']}\n" for r in rows)
    )
    (tmp_path / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "index.parquet")
    kw = dict(global_batch_size=4, seed=0, example_fn=fn, process_index=0, process_count=1)
    it = make_iterator(
        cfg_for(source="folder", index_file=str(tmp_path / "index.csv")), "train", train=False, **kw
    )
    assert ids(it) == list(range(6))  # no split column in the CSV: all rows
    for name in ("index.jsonl", "index.parquet"):
        cfg = cfg_for(source="folder", index_file=str(tmp_path / name))
        assert ids(make_iterator(cfg, "val", train=False, **kw)) == [4, 5]
        train = make_iterator(cfg, "train", **kw)
        assert sorted(ids([next(train)])) == [0, 1, 2, 3]
    cfg = cfg_for(source="folder", index_file=str(tmp_path / "index.csv"), caption_key="")
    assert ids(make_iterator(cfg, "train", train=False, **kw)) == list(range(6))


def test_folder_sharded_across_processes(tmp_path):
    rows = folder(tmp_path)
    (tmp_path / "index.jsonl").write_text(
        "".join(json.dumps({"file": r["path"], "text": r["caption"]}) + "\n" for r in rows)
    )
    cfg = cfg_for(source="folder", index_file=str(tmp_path / "index.jsonl"))
    seen = []
    for p in range(2):
        seen += ids(
            make_iterator(
                cfg,
                "train",
                global_batch_size=4,
                seed=3,
                example_fn=fn,
                train=False,
                process_index=p,
                process_count=2,
            )
        )
    assert sorted(seen) == list(range(6))


def test_tfds_imagenet_and_mnist_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    kw = dict(
        global_batch_size=4,
        seed=0,
        process_index=0,
        process_count=1,
        example_fn=lambda raw, rng: {
            "image": image_ops.resize_and_crop(raw["image"], 8),
            "label": raw["label"],
            "caption": np.array(raw["caption"]),
        },
    )
    with tfds.testing.mock_data(num_examples=6):
        cfg = cfg_for(source="tfds", name="imagenet2012", min_image_side=1)
        it = make_iterator(cfg, "validation", train=False, **kw)
        batches = list(it)
        assert len(batches) == 2 and int(sum(b["_mask"].sum() for b in batches)) == 6
        b = batches[0]
        assert b["image"].shape == (4, 8, 8, 3) and b["image"].dtype == np.uint8
        assert b["label"].dtype.kind == "i" and b["caption"].tolist() == [""] * 4
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        it = make_iterator(cfg_for(source="tfds", name="mnist"), "train", **kw)
        assert next(it)["image"].shape == (4, 8, 8, 3)  # grayscale -> RGB


def test_tfds_unprepared_dataset_is_a_clear_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    cfg = cfg_for(source="tfds", name="mnist", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="mnist"):
        make_iterator(
            cfg, "train", global_batch_size=2, seed=0, example_fn=fn, process_index=0, process_count=1
        )


def test_tfds_coco_captions_through_an_injected_reader(monkeypatch):
    """coco_captions' mock needs TensorFlow, so feed the source examples shaped like its
    array_record decoding: 'captions' is a dict of per-caption arrays."""

    def reader(name, split, data_dir):
        assert (name, split) == ("coco_captions", "train")
        return [
            {
                "image": image(i, 24, 40),
                "image/id": i,
                "captions": {
                    "id": np.arange(3),
                    "text": np.array([f"c{i}-{j}".encode() for j in range(3)], dtype=object),
                },
            }
            for i in range(4)
        ]

    monkeypatch.setattr(sources, "_tfds_data_source", reader)
    cfg = cfg_for(source="tfds", name="coco_captions", caption_key="captions/text")
    kw = dict(global_batch_size=4, seed=1, process_index=0, process_count=1)
    train = make_iterator(cfg, "train", example_fn=fn, **kw)
    picked = {}
    for _ in range(12):
        b = next(train)
        for i, c in zip(b["id"].tolist(), b["caption"].tolist()):
            assert c.startswith(f"c{i}-")
            picked.setdefault(i, set()).add(c)
    assert all(len(v) > 1 for v in picked.values())  # a different caption in different epochs
    eval_fn = lambda raw, rng: {
        "id": np.int32(raw["image"][0, 0, 0]),
        "captions": np.array(raw["captions"]),
        "caption": np.array(raw["caption"]),
    }
    batch = next(make_iterator(cfg, "train", example_fn=eval_fn, train=False, **kw))
    assert batch["captions"].tolist()[2] == ["c2-0", "c2-1", "c2-2"]
    assert batch["caption"].tolist()[2] == "c2-0"


def test_bucket_style_paths_through_fsspec(tmp_path):
    """fsspec's in-memory filesystem stands in for gs:// / s3:// (same code path, no network)."""
    fsspec = pytest.importorskip("fsspec")
    write_shards(tmp_path, 2, 3)
    fs = fsspec.filesystem("memory")
    for s in range(2):
        fs.pipe(f"/bucket-test/wds/shard-{s:05d}.tar", (tmp_path / f"shard-{s:05d}.tar").read_bytes())
    fs.pipe("/bucket-test/folder/imgs/a.png", encode(image(7)))
    fs.pipe("/bucket-test/folder/index.csv", b"path,caption\nimgs/a.png,seven\n")
    kw = dict(global_batch_size=6, seed=0, example_fn=fn, train=False, process_index=0, process_count=1)
    for urls in ("memory://bucket-test/wds/shard-{00000..00001}.tar", "memory://bucket-test/wds/shard-*.tar"):
        assert ids(make_iterator(cfg_for(source="webdataset", urls=urls), "x", **kw)) == list(range(6))
    cfg = cfg_for(source="folder", index_file="memory://bucket-test/folder/index.csv")
    assert ids(make_iterator(cfg, "x", **kw)) == [7]
    with pytest.raises(FileNotFoundError, match="shard-00002"):
        make_iterator(
            cfg_for(source="webdataset", urls="memory://bucket-test/wds/shard-{00000..00002}.tar"), "x", **kw
        )
