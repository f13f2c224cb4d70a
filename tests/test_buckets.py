"""Workdirs, data and outputs on buckets: a GCS emulator and moto's S3 server on loopback
(tests/buckets.py), the real gcsfs / s3fs / tensorstore clients talking to them."""

import dataclasses
import io
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from core_jax import storage, trainer
from core_jax.app import load_config
from core_jax.errors import ConfigError
from tests.buckets import free_port, gcs_emulator, local_files, s3_server
from tests.workdirs import TINY_CLIP_TOWERS, tiny_dvae_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_DEVICE = jax.devices()[:1]


@pytest.fixture(scope="module")
def module_monkeypatch():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def gcs(module_monkeypatch):
    with gcs_emulator(module_monkeypatch) as url:
        yield url


@pytest.fixture(scope="module")
def s3(module_monkeypatch):
    with s3_server(module_monkeypatch) as url:
        yield url


def tiny(c, steps, checkpoint_every=1):
    c.total_steps, c.batch_size, c.log_every = steps, 8, 1
    c.eval_every, c.checkpoint_every = 1000, checkpoint_every
    # A schedule that does not follow total_steps, as in tests/test_sources_train.py.
    c.optim.warmup_steps, c.optim.decay_steps = 1, 10
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    return c


def clip_config(steps=2, checkpoint_every=1):
    c = tiny(load_config("clip_shapes"), steps, checkpoint_every)
    c.model.image_size = c.data.image_size = 16
    c.model.update(**TINY_CLIP_TOWERS)
    c.eval.evaluators = ""
    return c


def dalle_config(dvae_workdir, steps=1):
    c = tiny(load_config("dalle_shapes"), steps)
    m = c.model
    m.image_grid, m.image_vocab_size, m.attention_pattern = 4, 32, "full"
    m.d_model, m.num_heads, m.head_dim, m.num_layers, m.mlp_dim = 16, 2, 8, 1, 32
    c.data.image_size = 16
    c.dvae_workdir = dvae_workdir
    return c


def losses(workdir) -> dict[int, float]:
    with storage.open(storage.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def train(config, workdir, make_task, stop_at_step=None):
    # One device: the bucket is the point here, and the programs compile faster than for eight. No
    # FLOP count: the trainer would measure this CPU's peak (seconds) for every run's MFU.
    task = dataclasses.replace(make_task(config, workdir), flops_per_example=None)
    trainer.train(config, workdir, task, devices=ONE_DEVICE, stop_at_step=stop_at_step, log_fn=lambda _: None)


def test_gs_workdirs_train_resume_and_commands_use_the_bucket_with_nothing_on_local_disk(
    gcs, tmp_path, monkeypatch
):
    from clip_jax import embed, evaluate
    from clip_jax.task import make_task as clip_task
    from dalle_jax import generate, reconstruct
    from dalle_jax.dalle_task import make_task as dalle_task

    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))

    # CLIP: stopped after step 1 (as a crash would), resumed from that step's checkpoint, and
    # compared with one straight run (which saves only at its end: saves change no loss).
    train(clip_config(checkpoint_every=1000), "gs://bucket/clip_straight", clip_task)
    train(clip_config(), "gs://bucket/clip", clip_task, stop_at_step=1)
    train(clip_config(), "gs://bucket/clip", clip_task)
    straight, resumed = losses("gs://bucket/clip_straight"), losses("gs://bucket/clip")
    assert sorted(straight) == [1, 2] and resumed == straight, (resumed, straight)
    for name in ("config.json", "tokenizer/merges.txt", "checkpoints/1", "checkpoints/2"):
        assert storage.exists(f"gs://bucket/clip/{name}"), name
    assert storage.glob("gs://bucket/clip/tensorboard/events.out.tfevents.*"), "no TensorBoard events"

    # DALL-E (one step) on a dVAE workdir in the bucket; its checkpoint is what generate reads.
    tiny_dvae_workdir("gs://bucket/dvae", size=16, codes=32)
    train(dalle_config("gs://bucket/dvae"), "gs://bucket/dalle", dalle_task)
    assert sorted(losses("gs://bucket/dalle")) == [1]

    results = generate.main(
        ["--workdir", "gs://bucket/dalle", "--prompt", "a red circle", "--num_samples", "2"]
        + ["--batch_size", "2", "--out_dir", "gs://bucket/samples", "--clip_workdir", "gs://bucket/clip"]
    )
    scores = json.loads(storage.read_text("gs://bucket/samples/scores.json"))
    assert scores["reranked"] and len(results[0]["images"]) == 2
    assert {"000.png", "001.png", "grid.png", "tokens.npy"} <= set(storage.listdir("gs://bucket/samples"))

    evaluate.main(
        ["--workdir", "gs://bucket/clip", "--out", "gs://bucket/eval.json"]
        + ["--config.eval.zeroshot_source=shapes", "--config.eval.max_examples=8"]
    )
    assert json.loads(storage.read_text("gs://bucket/eval.json"))

    # The samples in the bucket as input: embedded by the CLIP, reconstructed by the dVAE.
    storage.write_text("gs://bucket/texts.txt", "a red circle\na blue square\n")
    arrays = embed.main(
        ["--workdir", "gs://bucket/clip", "--input_dir", "gs://bucket/samples"]
        + ["--texts_file", "gs://bucket/texts.txt", "--out", "gs://bucket/embeddings.npz"]
    )
    with np.load(io.BytesIO(storage.read_bytes("gs://bucket/embeddings.npz"))) as saved:
        assert list(saved["image_files"]) == ["000.png", "001.png", "grid.png"]
        assert saved["text_embeddings"].shape == arrays["text_embeddings"].shape == (2, 8)
    reconstruct.main(
        [
            "--workdir",
            "gs://bucket/dvae",
            "--input_dir",
            "gs://bucket/samples",
            "--out_dir",
            "gs://bucket/rec",
        ]
    )
    assert storage.files_in("gs://bucket/rec") == ["000.png", "001.png", "grid.png"]

    assert local_files(cwd) == [] and local_files(home) == [], (local_files(cwd), local_files(home))


def toy_worker(workdir, kill_at=None):
    """tests/fault_worker.py (the toy task as a trainer command) on one device, 12 steps, saving
    every 2; `kill_at` (its FAULT_KILL_AT) makes it SIGKILL itself there."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("device_count=8", "device_count=1")
    env.pop("FAULT_KILL_AT", None)
    if kill_at:
        env["FAULT_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "tests.fault_worker", f"--workdir={workdir}"]
    cmd += ["--config.total_steps=12", "--config.checkpoint_every=2", "--config.keep_checkpoints=10"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.faults  # `make faults`: 12 steps run three times against the emulator
def test_kill_9_on_a_gs_workdir_then_resume_ends_as_an_uninterrupted_run(gcs):
    """A trainer process killed with SIGKILL mid-run (no cleanup, as a lost host) once its step-2
    checkpoint is complete in the bucket, started again: it resumes from a checkpoint in the bucket
    and ends with the params and losses of a run that was never interrupted."""
    from core_jax import checkpoint

    straight = toy_worker("gs://bucket/toy_straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = toy_worker("gs://bucket/toy", kill_at="saved:2")
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    resumed = toy_worker("gs://bucket/toy")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = re.search(r"resumed from gs://bucket/toy at step (\d+)", resumed.stdout + resumed.stderr)
    assert start and 2 <= int(start[1]) < 12, resumed.stdout[-3000:]

    assert losses("gs://bucket/toy") == losses("gs://bucket/toy_straight")
    assert sorted(losses("gs://bucket/toy")) == list(range(1, 13))
    got, want = (checkpoint.load_params(w)[1] for w in ("gs://bucket/toy", "gs://bucket/toy_straight"))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_s3_metrics_config_tokenizer_and_token_shards_round_trip(s3, tmp_path, monkeypatch):
    """What goes to s3:// besides checkpoints (orbax writes those to local paths and gs:// only):
    metrics appended across two runs through the local mirror, TensorBoard events, images,
    config.json, the BPE trained into the workdir, token shards read back row by row."""
    from core_jax.checkpoint import read_config, write_config
    from core_jax.data.token_shards import TokenShardSource
    from core_jax.metrics import MetricsWriter
    from core_jax.text import tokenizer_from_config

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    wd = "s3://bucket/run"
    config = clip_config()
    write_config(wd, config)
    assert read_config(wd).to_dict() == json.loads(json.dumps(config.to_dict(), default=str))
    for step in (1, 2):  # two runs: the second appends to the first's metrics.jsonl
        writer = MetricsWriter(wd)
        writer.write_scalars(step, {"loss": float(step)})
        writer.write_images(step, {"samples": np.full((4, 4, 3), step, np.uint8)})
        writer.close()
    assert losses(wd) == {1: 1.0, 2: 2.0}
    assert storage.files_in(f"{wd}/images") == ["samples_0000001.png", "samples_0000002.png"]
    events = storage.glob(f"{wd}/tensorboard/events.out.tfevents.*")
    assert events and all(storage.read_bytes(e) for e in events), events
    assert local_files(tmp_path / "cache") == []  # the mirrors are gone once closed

    tokenizer = tokenizer_from_config(config.text, wd, data_source="shapes")
    again = tokenizer_from_config(config.text, wd, data_source="shapes")  # read back, not retrained
    assert storage.isfile(f"{wd}/tokenizer/merges.txt")
    assert (tokenizer.encode(["a red circle"]) == again.encode(["a red circle"])).all()

    shards = "s3://bucket/tokens"
    tokens = np.arange(2 * 16, dtype=np.int32).reshape(2, 4, 4) % 32
    with storage.open(f"{shards}/train-00000.npz", "wb") as f:
        np.savez(f, tokens=tokens, captions=np.asarray(["a", "b"]), keys=np.asarray(["k0", "k1"]))
    index = {"grid_size": 4, "vocab_size": 32, "splits": {"train": {"shards": ["train-00000.npz"]}}}
    storage.write_text(f"{shards}/index.json", json.dumps(index))
    source = TokenShardSource(shards, "train")
    assert len(source) == 2 and (source[1]["image_tokens"] == tokens[1].reshape(-1)).all()
    index["splits"]["train"]["shards"] = ["../run/config.json"]  # an entry leading out of the folder
    storage.write_text(f"{shards}/index.json", json.dumps(index))
    with pytest.raises(ConfigError, match="climbs out of the folder"):
        TokenShardSource(shards, "train")
    # A shard the index lists but the bucket lacks (in its folder, or in a folder it lacks).
    for missing in ("train-00001.npz", "more/train-00000.npz"):
        index["splits"]["train"]["shards"] = ["train-00000.npz", missing]
        storage.write_text(f"{shards}/index.json", json.dumps(index))
        with pytest.raises(FileNotFoundError, match=f"lists {missing}, which does not exist"):
            TokenShardSource(shards, "train")


def command(tmp_path, module, *args, setup=""):
    """`python -m module args` in an empty folder; (exit code, stderr lines, files left there)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    code = f"{setup}import runpy, sys; sys.argv = ['{module}', *{list(args)!r}]; runpy.run_module('{module}', run_name='__main__')"
    env = dict(
        os.environ, PYTHONPATH=REPO, HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "cache")
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    return proc.returncode, proc.stderr.strip().splitlines(), local_files(tmp_path)


# A filesystem package that is not installed: importing it fails, as `import gcsfs` would.
NO_GCSFS = "import sys; sys.modules['gcsfs'] = None; "
NO_S3FS = "import sys; sys.modules['s3fs'] = None; "


def test_missing_gcsfs_is_one_line_naming_the_extra_before_anything_is_written(tmp_path):
    code, err, left = command(
        tmp_path, "clip_jax.train", "--config", "clip_shapes", "--workdir", "gs://bucket/run", setup=NO_GCSFS
    )
    assert code == 2 and err == ["error: gs://bucket/run needs gcsfs: pip install 'dalle-clip-jax[gcs]'"], err
    assert left == []


def test_missing_s3fs_is_one_line_naming_the_extra_before_anything_is_written(tmp_path):
    code, err, left = command(
        tmp_path,
        "dalle_jax.generate",
        "--workdir",
        "runs/dalle",
        "--prompt",
        "a red circle",
        "--out_dir",
        "s3://bucket/samples",
        setup=NO_S3FS,
    )
    assert code == 2 and err == ["error: s3://bucket/samples needs s3fs: pip install 'dalle-clip-jax[s3]'"], (
        err
    )
    assert left == []


def test_nonexistent_bucket_is_one_line_naming_it_before_anything_is_written(gcs, tmp_path):
    code, err, left = command(
        tmp_path, "clip_jax.train", "--config", "clip_shapes", "--workdir", "gs://no-such-bucket/run"
    )
    assert code == 2 and err == [
        "error: bucket gs://no-such-bucket does not exist (for gs://no-such-bucket/run)"
    ], err
    assert left == []


def test_unreachable_endpoint_is_one_line_naming_the_bucket(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    code, err, left = command(
        tmp_path, "clip_jax.embed", "--workdir", "s3://bucket/clip", "--texts_file", "t.txt", "--out", "e.npz"
    )
    assert (
        code == 2
        and len(err) == 1
        and err[0].startswith("error: cannot reach s3://bucket (for s3://bucket/clip): ")
    ), err
    assert left == []


def test_s3_workdir_for_a_trainer_is_refused_in_one_line(s3, tmp_path):
    code, err, left = command(
        tmp_path, "clip_jax.train", "--config", "clip_shapes", "--workdir", "s3://bucket/run"
    )
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: --workdir s3://bucket/run: orbax-checkpoint") and "gs://" in err[0], err
    assert left == []


def test_storage_helpers_on_local_paths_and_another_fsspec_url(tmp_path):
    """The same calls on a local folder, its file:// URL and fsspec's in-memory store."""
    for root in (str(tmp_path / "local"), f"file://{tmp_path}/url", "memory://helpers"):
        storage.makedirs(storage.join(root, "sub"))
        storage.write_text(storage.join(root, "sub", "a.txt"), "hello")
        with storage.open(storage.join(root, "sub", "b.bin"), "wb") as f:
            f.write(b"0123456789")
        assert storage.read_text(storage.join(root, "sub", "a.txt")) == "hello"
        assert storage.isdir(storage.join(root, "sub")) and not storage.isfile(storage.join(root, "sub"))
        assert storage.files_in(storage.join(root, "sub")) == ["a.txt", "b.bin"]
        assert [storage.basename(p) for p in storage.glob(storage.join(root, "sub", "*.txt"))] == ["a.txt"]
        assert storage.RangeReader(storage.join(root, "sub", "b.bin")).read(3, 4) == b"3456"
        assert not storage.exists(storage.join(root, "missing"))
        storage.check_reachable(root)  # local paths and stores without buckets pass
    assert storage.is_remote("memory://helpers") and not storage.is_remote(f"file://{tmp_path}")
    assert storage.absolute("gs://b/run") == "gs://b/run" and storage.dirname("gs://b/run/") == "gs://b"
