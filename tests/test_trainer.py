"""The shared trainer: sharded == single-device, exact resume, resharding restore, NaN skips."""

import json
import os

import jax
import numpy as np
import pytest

from core_jax import trainer
from tests.toy_task import counting_inits, make_toy_task, toy_config

# Sharded reductions sum in a different order than one device; 1e-5 relative covers float32 noise
# over a few steps, while any real sharding bug (wrong rows, missing all-reduce) is off by far more.
RTOL = 1e-5


def losses(workdir):
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted 6-step run on mesh (8,1,1), shared by the tests that compare against it."""
    return run(tmp_path_factory.mktemp("full"), "full", (8, 1, 1))


def run(tmp_path, name, mesh, devices=None, **kw):
    config = toy_config(**{"mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]})
    wd = str(tmp_path / name)
    trainer.train(config, wd, make_toy_task(config), devices=devices, log_fn=lambda s: None, **kw)
    return wd


def test_sharded_training_matches_one_device(tmp_path, full_run):
    ref = losses(run(tmp_path, "one", (1, 1, 1), devices=jax.devices()[:1]))
    assert len(ref) == 6 and len(set(ref.values())) == 6, ref  # params really move
    for mesh in [(8, 1, 1), (2, 2, 2), (1, 8, 1)]:
        got = losses(full_run if mesh == (8, 1, 1) else run(tmp_path, "m%d%d%d" % mesh, mesh))
        np.testing.assert_allclose(
            [got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=RTOL, err_msg=f"mesh {mesh}"
        )


def test_resume_reproduces_uninterrupted_run(tmp_path, full_run):
    full = losses(full_run)
    config = toy_config()
    wd, inits = str(tmp_path / "crash"), []
    trainer.train(
        config, wd, counting_inits(make_toy_task(config), inits), log_fn=lambda s: None, stop_at_step=3
    )
    assert sorted(losses(wd)) == [1, 2, 3] and inits
    inits.clear()
    trainer.train(config, wd, counting_inits(make_toy_task(config), inits), log_fn=lambda s: None)
    assert not inits  # restored into the abstract state: a resumed run never runs the init
    resumed = losses(wd)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([resumed[s] for s in range(1, 7)], [full[s] for s in range(1, 7)], rtol=1e-6)


def test_restore_onto_another_mesh(tmp_path, full_run):
    full = losses(full_run)
    wd = run(tmp_path, "a", (8, 1, 1), stop_at_step=3)
    config = toy_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    trainer.train(config, wd, make_toy_task(config), log_fn=lambda s: None)
    resumed = losses(wd)
    np.testing.assert_allclose([resumed[s] for s in range(4, 7)], [full[s] for s in range(4, 7)], rtol=RTOL)


def test_nonfinite_update_is_skipped_and_counted(tmp_path):
    config = toy_config(total_steps=4)
    wd = str(tmp_path / "nan")
    trainer.train(config, wd, make_toy_task(config, poison_step=1), log_fn=lambda s: None)
    rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
    by_step = {r["step"]: r for r in rows}
    assert by_step[2]["nonfinite"] == 1 and by_step[4]["nonfinite_skipped"] == 1
    assert np.isfinite(by_step[4]["loss"]) and np.isfinite(by_step[4]["param_norm"])
    # The skipped step left params untouched: its param norm equals the one before it.
    assert by_step[2]["param_norm"] == pytest.approx(by_step[1]["param_norm"], rel=1e-7)


def test_nonfinite_abort_policy_stops(tmp_path):
    config = toy_config(total_steps=4, nan_policy="abort")
    with pytest.raises(trainer.NonFiniteLoss, match="step 2"):
        trainer.train(
            config, str(tmp_path / "abort"), make_toy_task(config, poison_step=1), log_fn=lambda s: None
        )


def test_grad_accumulation_matches_full_batch(tmp_path, full_run):
    a = losses(full_run)
    config = toy_config(grad_accum_steps=2)
    wd = str(tmp_path / "accum")
    trainer.train(config, wd, make_toy_task(config), log_fn=lambda s: None)
    b = losses(wd)
    np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-5)


def test_metrics_and_workdir_layout(full_run):
    wd = full_run
    row = json.loads(open(os.path.join(wd, "metrics.jsonl")).readline())
    for key in ("step", "loss", "learning_rate", "examples_per_sec", "mfu"):
        assert key in row, key
    assert 0 < row["mfu"] < 1
    assert json.load(open(os.path.join(wd, "config.json")))["batch_size"] == 16
    assert os.listdir(os.path.join(wd, "tensorboard"))
    assert sorted(os.listdir(os.path.join(wd, "checkpoints")))[-1] == "6"


def test_eval_batches_follow_the_params_mesh_and_stop_at_max_batches():
    from jax.sharding import NamedSharding, PartitionSpec as P

    from core_jax import sharding

    config = toy_config()
    example_fn = lambda raw, rng: {"label": np.int32(len(raw["caption"]))}  # noqa: E731
    add_one = lambda local: dict(local, label=local["label"] + 1)  # noqa: E731
    mesh = sharding.make_mesh(config.mesh)
    sharded = {"w": jax.device_put(np.zeros((8, 2), np.float32), NamedSharding(mesh, P("data")))}
    batches = list(trainer.eval_batches(config, sharded, example_fn, max_batches=2, batch_fn=add_one))
    assert len(batches) == 2 and set(batches[0]) == {"label", "_mask"}
    assert batches[0]["label"].shape == (16,) and batches[0]["label"].sharding.mesh.shape == mesh.shape
    plain = list(trainer.eval_batches(config, {"w": np.zeros(2)}, example_fn, max_batches=2))
    assert not isinstance(plain[0]["label"].sharding, NamedSharding)  # off a mesh: plain arrays
    for b, p in zip(batches, plain):
        np.testing.assert_array_equal(np.asarray(b["label"]), np.asarray(p["label"]) + 1)
        assert np.asarray(b["_mask"]).all()
    assert list(trainer.eval_batches(config, sharded, example_fn, max_batches=0)) == []


def test_host_eval_batches_count_skips_and_close_the_iterator(monkeypatch):
    from core_jax.data import SkipExample

    config = toy_config()
    opened, closed = [], []
    make_iterator = trainer.data_lib.make_iterator

    def recording(*args, **kwargs):
        it = make_iterator(*args, **kwargs)
        close = it.close
        it.close = lambda: (closed.append(it), close())
        opened.append(it)
        return it

    def example_fn(raw, rng):
        if len(raw["caption"]) % 2:
            raise SkipExample("odd_caption")
        return {"label": np.int32(len(raw["caption"]))}

    monkeypatch.setattr(trainer.data_lib, "make_iterator", recording)
    skipped = {}
    batches = trainer.host_eval_batches(
        config.data, config.data.eval_split, example_fn, batch_size=16, max_batches=3, skipped=skipped
    )
    assert len(opened) == 1 and not closed  # opened by the call, so a bad source fails there
    first = next(batches)
    assert isinstance(first["label"], np.ndarray) and first["label"].shape == (16,)
    assert (first["label"][first["_mask"]] % 2 == 0).all()
    batches.close()  # the caller stops early: the iterator closes and reports its skips
    assert closed == opened and skipped["odd_caption"] > 0
    capped = list(
        trainer.host_eval_batches(
            config.data, config.data.eval_split, example_fn, batch_size=16, max_batches=2
        )
    )
    assert len(capped) == 2 and len(closed) == 2  # a pass that stops at max_batches closes too
