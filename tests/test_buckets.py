"""Workdirs, data and outputs on buckets: a GCS emulator and moto's S3 server on loopback
(tests/buckets.py), the real gcsfs / s3fs / tensorstore clients talking to them."""

import json
import os

import pytest

from core_jax import storage, trainer
from core_jax.app import load_config
from tests.buckets import gcs_emulator, local_files, s3_server
from tests.workdirs import tiny_dvae_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def tiny(c, steps):
    c.total_steps, c.batch_size, c.log_every = steps, 8, 1
    c.eval_every, c.checkpoint_every = 1000, 1
    # A schedule that does not follow total_steps, as in tests/test_sources_train.py.
    c.optim.warmup_steps, c.optim.decay_steps = 1, 10
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 8, 1, 1
    return c


def clip_config(steps=3):
    c = tiny(load_config("clip_shapes"), steps)
    c.model.image_size = c.data.image_size = 16
    c.model.update(
        vision_width=16,
        vision_layers=1,
        vision_heads=2,
        text_width=16,
        text_layers=1,
        text_heads=2,
        embed_dim=8,
    )
    c.eval.evaluators = ""
    return c


def dalle_config(dvae_workdir, steps=2):
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
    trainer.train(
        config, workdir, make_task(config, workdir), stop_at_step=stop_at_step, log_fn=lambda _: None
    )


def test_gs_workdirs_train_resume_generate_and_evaluate_with_nothing_on_local_disk(
    gcs, tmp_path, monkeypatch
):
    from clip_jax import evaluate
    from clip_jax.task import make_task as clip_task
    from dalle_jax import generate
    from dalle_jax.dalle_task import make_task as dalle_task

    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))

    # CLIP: stopped after step 1 (as a crash would), resumed, and compared with one straight run.
    config = clip_config()
    train(config, "gs://bucket/clip_straight", clip_task)
    train(config, "gs://bucket/clip", clip_task, stop_at_step=1)
    train(config, "gs://bucket/clip", clip_task)
    straight, resumed = losses("gs://bucket/clip_straight"), losses("gs://bucket/clip")
    assert sorted(straight) == [1, 2, 3] and resumed == straight, (resumed, straight)
    for name in ("config.json", "tokenizer/merges.txt", "checkpoints/3"):
        assert storage.exists(f"gs://bucket/clip/{name}"), name
    assert storage.listdir("gs://bucket/clip/tensorboard"), "no TensorBoard events"

    # DALL-E on a dVAE workdir in the bucket: one step, stopped, resumed for the second.
    tiny_dvae_workdir("gs://bucket/dvae", size=16, codes=32)
    config = dalle_config("gs://bucket/dvae")
    train(config, "gs://bucket/dalle", dalle_task, stop_at_step=1)
    train(config, "gs://bucket/dalle", dalle_task)
    assert sorted(losses("gs://bucket/dalle")) == [1, 2]

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

    assert local_files(cwd) == [] and local_files(home) == [], (local_files(cwd), local_files(home))
