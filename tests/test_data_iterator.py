"""Order, sharding, eval padding, workers and exact resume of core_jax.data iterators."""

import json

import numpy as np
import pytest

from core_jax.config import ConfigError
from core_jax.data import (
    DataIterator,
    NoUsableExamples,
    SkipExample,
    default_data_config,
    image_ops,
    make_iterator,
)
from core_jax.data.iterator import IndexStream
from core_jax.data.shapes import HELD_OUT_PAIRS


class ListSource:
    """Random-access stand-in: record i is an 8x8 image filled with i; `bad` indices skip."""

    def __init__(self, n, bad=()):
        self.n, self.bad, self.name = n, set(bad), f"list[{n}]"

    def __len__(self):
        return self.n

    def load(self, i, rng):
        if i in self.bad:
            raise SkipExample("corrupt_image")
        return {
            "image": np.full((8, 8, 3), i, np.uint8),
            "caption": str(i),
            "captions": [str(i)],
            "label": i,
            "key": str(i),
        }


def augment(raw, rng):
    """Uses the rng so that worker count / process count independence is actually tested."""
    img = image_ops.maybe_flip(raw["image"], rng)
    return {"x": img.astype(np.float32) + rng.random(), "label": np.int32(raw["label"])}


def list_iterator(n, *, bad=(), batch=4, seed=0, train=True, workers=0, p=0, P=1, fn=augment, prefetch=2):
    stream = IndexStream(ListSource(n, bad), train=train, seed=seed, process_index=p, process_count=P)
    return DataIterator(
        stream,
        batch_size=batch,
        seed=seed,
        example_fn=fn,
        train=train,
        num_workers=workers,
        prefetch=prefetch,
        process_index=p,
        process_count=P,
    )


def shapes_config(**kw):
    cfg = default_data_config()
    cfg.update(kw)
    return cfg


def labels(batches):
    return [b["label"].tolist() for b in batches]


def test_default_config_has_every_contract_key():
    cfg = default_data_config()
    for key in (
        "source",
        "name",
        "split",
        "eval_split",
        "data_dir",
        "urls",
        "index_file",
        "image_key",
        "caption_key",
        "label_key",
        "image_size",
        "random_crop",
        "random_flip",
        "num_workers",
        "prefetch",
        "shapes_train_size",
        "min_image_side",
        "max_image_pixels",
        "shuffle_buffer",
        "shapes_one_object_fraction",
        "shapes_train_pairs",
    ):
        assert key in cfg
    assert cfg.source == "shapes" and cfg.num_workers == 0


def test_shapes_default_source_and_process_slices():
    cfg = shapes_config(shapes_train_size=16)
    fn = lambda raw, rng: {"image": image_ops.to_float01(raw["image"]), "key": np.array(raw["key"])}
    its = [
        make_iterator(
            cfg, "train", global_batch_size=8, seed=1, example_fn=fn, process_index=p, process_count=2
        )
        for p in range(2)
    ]
    batches = [[next(it) for _ in range(2)] for it in its]
    assert batches[0][0]["image"].shape == (4, 64, 64, 3)
    keys = [k for per in batches for b in per for k in b["key"].tolist()]
    assert sorted(keys) == sorted(f"train/{i}" for i in range(16))  # one epoch, no overlap
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        make_iterator(
            cfg, "train", global_batch_size=5, seed=1, example_fn=fn, process_index=0, process_count=2
        )


def test_make_iterator_uses_jax_process_defaults():
    it = make_iterator(
        shapes_config(shapes_train_size=4),
        "train",
        global_batch_size=2,
        seed=0,
        example_fn=lambda raw, rng: {"label": raw["label"]},
    )
    assert next(it)["label"].shape == (2,)


def test_seeded_order_epochs_and_independence_of_workers():
    a = [next(it) for it in [list_iterator(12, seed=5)] for _ in range(9)]
    b_it = list_iterator(12, seed=5, workers=3, prefetch=1)
    b = [next(b_it) for _ in range(9)]
    for x, y in zip(a, b):
        assert np.array_equal(x["x"], y["x"]) and np.array_equal(x["label"], y["label"])
    epochs = [sum(labels(a[i : i + 3]), []) for i in range(0, 9, 3)]
    assert all(sorted(e) == list(range(12)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    c_it = list_iterator(12, seed=6)
    assert labels([next(c_it) for _ in range(3)]) != labels(a[:3])
    b_it.close()


def test_per_example_rng_does_not_depend_on_process_count():
    def draws(P):
        out = {}
        for p in range(P):
            it = list_iterator(12, seed=2, batch=6 // P, p=p, P=P)
            for _ in range(4):  # two epochs of 12 at 6 per global batch
                b = next(it)
                for lab, x in zip(b["label"].tolist(), b["x"]):
                    out.setdefault(lab, []).append(float(x[0, 0, 0]))
        return {k: sorted(v) for k, v in out.items()}

    assert draws(1) == draws(2)


def test_resume_is_exact_with_skips_and_workers():
    def skip_some(raw, rng):
        if rng.random() < 0.2:
            raise SkipExample("unlucky")
        return augment(raw, rng)

    for workers in (0, 2):
        it = list_iterator(10, bad=(3, 7), seed=4, workers=workers, fn=skip_some)
        for _ in range(5):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        skipped = it.skipped
        assert skipped["corrupt_image"] >= 2 and "unlucky" in skipped
        want = [next(it) for _ in range(6)]
        resumed = list_iterator(10, bad=(3, 7), seed=4, workers=2 - workers, fn=skip_some)
        resumed.set_state(state)
        assert resumed.skipped == skipped
        for w in want:
            g = next(resumed)
            assert np.array_equal(g["x"], w["x"]) and np.array_equal(g["label"], w["label"])
        # set_state on a running iterator rewinds it.
        it.set_state(state)
        assert np.array_equal(next(it)["x"], want[0]["x"])
        it.close()
        resumed.close()
    with pytest.raises(ValueError, match="process"):
        list_iterator(10, p=1, P=2).set_state(state)


def test_eval_single_pass_padded_every_example_once():
    P, seen, counts = 3, [], []
    for p in range(P):
        it = list_iterator(10, bad=(4,), train=False, batch=2, p=p, P=P, workers=p % 2)
        batches = list(it)
        counts.append(len(batches))
        assert all(b["_mask"].shape == (2,) for b in batches)
        for b in batches:
            seen += b["label"][b["_mask"]].tolist()
            assert not b["x"][~b["_mask"]].any()
        assert list(it) == []
    assert counts == [2, 2, 2] and sorted(seen) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    train_batch = next(list_iterator(10, batch=2))
    assert "_mask" not in train_batch


def test_shapes_eval_split():
    cfg = shapes_config()
    it = make_iterator(
        cfg,
        cfg.eval_split,
        global_batch_size=256,
        seed=0,
        train=False,
        example_fn=lambda raw, rng: {"label": np.int32(raw["label"])},
        process_index=1,
        process_count=2,
    )
    assert it.num_batches == 4
    assert sum(int(b["_mask"].sum()) for b in it) == 500


def test_shapes_one_object_fraction_sets_the_train_mix_only():
    objects = lambda raw, rng: {"n": np.int32(len(raw["objects"]))}
    counts = {}
    for frac in (0.5, 0.2, 1.0):
        cfg = shapes_config(shapes_train_size=200, shapes_one_object_fraction=frac)
        it = make_iterator(cfg, "train", global_batch_size=200, seed=0, example_fn=objects)
        counts[frac] = int((next(it)["n"] == 1).sum())
    assert counts[1.0] == 200 and 80 <= counts[0.5] <= 120 and 25 <= counts[0.2] <= 55
    # The test splits keep their fixed mix whatever the train mix is.
    test = [
        make_iterator(
            shapes_config(shapes_one_object_fraction=f),
            "test_seen",
            global_batch_size=100,
            seed=0,
            train=False,
            example_fn=objects,
        )
        for f in (0.5, 1.0)
    ]
    assert np.array_equal(next(test[0])["n"], next(test[1])["n"])
    with pytest.raises(ConfigError, match=r"data.shapes_one_object_fraction must be in \[0, 1\], got 1.5"):
        make_iterator(
            shapes_config(shapes_one_object_fraction=1.5),
            "train",
            global_batch_size=2,
            seed=0,
            example_fn=objects,
        )


def test_shapes_train_pairs_reaches_the_train_source_only():
    pairs = lambda raw, rng: {
        "held": np.int32(any((o["colour"], o["shape"]) in HELD_OUT_PAIRS for o in raw["objects"]))
    }
    held = {}
    for mode in ("seen", "all"):
        it = make_iterator(
            shapes_config(shapes_train_size=300, shapes_train_pairs=mode),
            "train",
            global_batch_size=300,
            seed=0,
            example_fn=pairs,
        )
        held[mode] = int(next(it)["held"].sum())
    assert held["seen"] == 0 and held["all"] > 60
    test = [
        make_iterator(
            shapes_config(shapes_train_pairs=m),
            "test_seen",
            global_batch_size=50,
            seed=0,
            train=False,
            example_fn=pairs,
        )
        for m in ("seen", "all")
    ]
    assert np.array_equal(next(test[0])["held"], next(test[1])["held"])
    with pytest.raises(ConfigError, match="data.shapes_train_pairs must be 'seen' or 'all', got 'some'"):
        make_iterator(
            shapes_config(shapes_train_pairs="some"), "train", global_batch_size=2, seed=0, example_fn=pairs
        )


def test_all_skipped_raises_named_error_and_errors_propagate():
    it = list_iterator(5, bad=range(5), batch=2)
    with pytest.raises(NoUsableExamples, match=r"list\[5\].*corrupt_image"):
        next(it)
    with pytest.raises(NoUsableExamples):
        next(list_iterator(5, bad=range(5), batch=2, train=False))

    def broken(raw, rng):
        raise KeyError("bug in example_fn")

    for workers in (0, 2):
        with pytest.raises(KeyError, match="bug in example_fn"):
            next(list_iterator(5, fn=broken, workers=workers))


def test_eval_with_more_processes_than_records_pads_from_a_borrowed_template():
    batches = list(list_iterator(2, train=False, batch=2, p=3, P=4))
    assert len(batches) == 1 and not batches[0]["_mask"].any()
    assert batches[0]["x"].shape == (2, 8, 8, 3)


def test_state_gathered_from_all_processes_restores_each_one():
    its = [list_iterator(10, bad=(2,), batch=2, p=p, P=2) for p in range(2)]
    for it in its:
        next(it)
    combined = {"processes": [it.get_state() for it in its]}  # what get_state gathers on pods
    want = [next(it) for it in its]
    for p in range(2):
        again = list_iterator(10, bad=(2,), batch=2, p=p, P=2)
        again.set_state(json.loads(json.dumps(combined)))
        assert np.array_equal(next(again)["x"], want[p]["x"])
