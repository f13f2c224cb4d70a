"""Two local processes x 4 fake CPU devices train CLIP and DALL-E as ONE job, equal to one process x 8 devices.

Each process builds only its half of every global batch; the trainer assembles global arrays with
jax.make_array_from_process_local_data and gloo carries the collectives. A checkpoint written by
the two-process job then restores in one process.

The two-process job runs as a user would, evaluation and sample images at its last step included;
the one-process runs it is compared with train without them: their losses and params are what is
compared, and evaluation is tested on one process elsewhere.
"""

import dataclasses
import importlib
import json
import os
import subprocess

import numpy as np
import pytest

from core_jax import checkpoint, trainer
from tests.testfiles import load_config
from tests.workdirs import tiny_dvae_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
# Cross-process all-reduces sum in another order than one process does: float32 noise only.
RTOL = 2e-5

JOBS = {
    "clip": (
        "clip_jax.train",
        "configs/clip_shapes.py",
        "clip_jax.task",
        [
            "model.vision_layers=1",
            "model.text_layers=1",
            "model.vision_width=64",
            "model.text_width=64",
            "model.embed_dim=32",
            "model.vision_heads=2",
            "model.text_heads=2",
            "eval.evaluators=",
        ],
    ),
    # Images are tokenized on the fly by a tiny random dVAE (16x16 -> 4x4 tokens, 32 codes) that the
    # test writes into DVAE_DIR; each process encodes only its own rows. Caption dropout (the
    # config's 0.15) is on: it is decided per example, so both jobs drop the same captions even
    # though two processes assemble the global batch in another row order.
    "dalle": (
        "dalle_jax.train",
        "configs/dalle_shapes.py",
        "dalle_jax.dalle_task",
        [
            "model.d_model=32",
            "model.num_heads=2",
            "model.head_dim=16",
            "model.num_layers=2",
            "model.mlp_dim=64",
            "model.image_grid=4",
            "model.image_vocab_size=32",
            "data.image_size=16",
            "dvae_workdir=DVAE_DIR",
        ],
    ),
}


def _config(path, overrides):
    config = load_config(os.path.splitext(os.path.basename(path))[0])
    for item in overrides:
        key, value = item.split("=", 1)
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = (
            type(node[last])(value.strip("'")) if not isinstance(node[last], str) else value.strip("'")
        )
    return config


def _losses(workdir):
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r["loss"] for r in sorted(rows, key=lambda r: r["step"]) if "loss" in r]


@pytest.mark.parametrize("job", sorted(JOBS))
def test_two_processes_match_one_process(tmp_path, job):
    entry, config_file, task_module, model_overrides = JOBS[job]
    common = [
        f"total_steps={STEPS}",
        "log_every=1",
        f"checkpoint_every={STEPS}",
        f"eval_every={STEPS + 10}",
        "batch_size=16",
        "data.shapes_train_size=256",
        # A schedule that does not follow total_steps: the resumed run below (STEPS + 1) compiles
        # the step the one-process run compiled (tests/compile_memo.py).
        "optim.warmup_steps=1",
        "optim.decay_steps=100",
    ]
    if job == "dalle":
        dvae_dir = tiny_dvae_workdir(str(tmp_path / "dvae"), size=16, codes=32)
        model_overrides = [o.replace("DVAE_DIR", dvae_dir) for o in model_overrides]
    overrides = common + model_overrides

    two = tmp_path / "two"
    args = [
        "bash",
        os.path.join(REPO, "launch/local.sh"),
        "--fake_devices",
        "4",
        "--processes",
        "2",
        entry,
        f"--config={os.path.join(REPO, config_file)}",
        f"--workdir={two}",
    ]
    args += [f"--config.{o}" for o in overrides]
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = _losses(two)
    assert len(got) == STEPS

    config = _config(config_file, overrides)
    one = tmp_path / "one"
    module = importlib.import_module(task_module)

    def make_task(config, workdir):
        return dataclasses.replace(module.make_task(config, workdir), evaluators=(), image_fn=None)

    trainer.train(config, str(one), make_task(config, str(one)), log_fn=lambda s: None)
    want = _losses(one)
    np.testing.assert_allclose(got, want, rtol=RTOL)

    # The two-process checkpoint restores in one process: same params as the one-process run.
    _, p_two = checkpoint.load_params(str(two))
    _, p_one = checkpoint.load_params(str(one))
    for (path, a), (_, b) in zip(*(jax_leaves(p) for p in (p_two, p_one))):
        if path.endswith("key_bias"):
            # Its true gradient is 0 (it adds the same q.b to every logit of a query), so Adam
            # turns float noise into lr-sized steps of either sign: both stay that small.
            assert np.abs(a).max() < 2e-4 and np.abs(b).max() < 2e-4, path
            continue
        # atol: Adam turns float-noise gradients of near-zero params into lr-sized steps.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=path)
    # ...and training resumes from it in one process (its data stream restarts on a new seed).
    config.unlock()
    config.total_steps = STEPS + 1
    log = []
    trainer.train(config, str(two), make_task(config, str(two)), log_fn=log.append)
    assert any("resumed" in l and f"step {STEPS}" in l for l in log), log
    assert len(_losses(two)) == STEPS + 1


def jax_leaves(tree):
    import jax

    return [
        (jax.tree_util.keystr(k, simple=True, separator="/"), np.asarray(x))
        for k, x in jax.tree_util.tree_leaves_with_path(tree)
    ]
