"""The real CLIP task through the shared trainer: training on 8 devices equals training on one.

The loss-level tests (test_clip_losses.py, test_clip_model.py) compare one forward; this runs the
whole step (global-batch softmax loss, gradients, AdamW, learnable temperature) for several steps,
so a wrong feature gather or a missing gradient all-reduce shows up as a diverging trajectory.
"""

import json
import os

import jax
import numpy as np

from core_jax import trainer
from tests.testfiles import load_config

STEPS = 4


def tiny_clip_config(mesh):
    c = load_config("clip_shapes")
    c.total_steps, c.batch_size, c.log_every = STEPS, 16, 1
    c.eval_every = c.checkpoint_every = 1000  # no evaluation or checkpoint inside the run
    c.optim.warmup_steps = 1
    c.optim.learning_rate = 3e-3  # large enough that the params really move in 4 steps
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    c.model.image_size = c.data.image_size = 16
    c.model.update(
        vision_width=32,
        vision_layers=1,
        vision_heads=2,
        text_width=32,
        text_layers=1,
        text_heads=2,
        embed_dim=16,
    )
    c.eval.evaluators = ""
    return c


def train_losses(tmp_path, mesh, devices=None):
    from clip_jax.task import make_task

    config = tiny_clip_config(mesh)
    workdir = str(tmp_path / ("m%d%d%d" % mesh))
    trainer.train(config, workdir, make_task(config, workdir), devices=devices, log_fn=lambda s: None)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r["loss"] for r in rows if "loss" in r], [r["temperature"] for r in rows if "loss" in r]


def test_clip_training_on_8_devices_matches_one_device(tmp_path):
    ref_loss, ref_scale = train_losses(tmp_path, (1, 1, 1), devices=jax.devices()[:1])
    assert len(ref_loss) == STEPS and len(set(ref_loss)) == STEPS, ref_loss  # params move
    # One mesh with every axis > 1: the batch is split 4 ways (data x fsdp), so the global-batch
    # feature gather is exercised, and params are split by fsdp and tensor. A pure data-parallel
    # (8, 1, 1) run adds ~30 s of compile and no code path this one misses.
    loss, scale = train_losses(tmp_path, (2, 2, 2))
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
    np.testing.assert_allclose(scale, ref_scale, rtol=2e-5)
