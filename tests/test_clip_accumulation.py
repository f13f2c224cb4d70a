"""Gradient accumulation keeps CLIP's global-batch objective, and tasks whose loss has a
batch-level term refuse it.

The contrastive loss couples every pair of the batch, so a mean over micro-batch losses would see
1/k of the negatives. The jitted train step (real shardings, state donated) must give the full
batch's loss and gradients for grad_accum_steps = 1, 2, 4, on a mesh with every axis > 1.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from core_jax import sharding, trainer
from core_jax.config import ConfigError
from tests.test_clip_train_sharded import tiny_clip_config

MESH = (2, 2, 2)
BATCH = 16


def grads_in_opt_state():
    """An "optimizer" that leaves params alone and keeps the step's gradients as its state, so the
    exact gradients come out of the real jitted train step."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
    )


def clip_batch(config, rng):
    size, length = config.model.image_size, config.text.context_length
    # Texts end in distinct large ids, so each row's end-of-text token (the argmax) differs.
    text = rng.integers(1, 200, size=(BATCH, length)).astype(np.int32)
    text[:, -1] = 300 + np.arange(BATCH)
    return {"image": rng.normal(size=(BATCH, size, size, 3)).astype(np.float32), "text": text}


def tiny_config(loss_kind, accum):
    config = tiny_clip_config(MESH)
    config.model.loss = loss_kind
    config.grad_accum_steps = accum
    return config


@pytest.mark.parametrize("loss_kind", ["softmax", "sigmoid", "sigmoid_chunked"])
def test_clip_accumulation_equals_full_batch(loss_kind):
    from clip_jax.task import make_task

    config = tiny_config(loss_kind, 1)
    mesh = sharding.make_mesh(config.mesh)
    batch = trainer.make_global_batch(mesh, clip_batch(config, np.random.default_rng(0)))
    tx = grads_in_opt_state()
    state, shardings = trainer.create_state(make_task(config, None), tx, mesh, config, batch)

    def step_metrics_and_grads(accum):
        config = tiny_config(loss_kind, accum)
        step = trainer.jit_train_step(
            make_task(config, None),
            tx,
            lambda s: 0.0,
            config,
            mesh,
            shardings,
            jax.tree.map(lambda x: x.sharding, batch),
        )
        with jax.set_mesh(mesh):  # a copy: the step donates its state
            new_state, metrics = step(jax.tree.map(jnp.copy, state), batch)
        return jax.device_get(metrics), jax.device_get(new_state.opt_state)

    ref_metrics, ref_grads = step_metrics_and_grads(1)
    for accum in (2, 4):
        metrics, grads = step_metrics_and_grads(accum)
        for key in ("loss", "grad_norm", "i2t_accuracy", "t2i_accuracy", "temperature"):
            np.testing.assert_allclose(
                metrics[key], ref_metrics[key], rtol=1e-5, err_msg=f"{key}, grad_accum_steps={accum}"
            )
        # rtol 1e-5; the atol (1e-6 of the largest gradient entry) is for entries that are zero
        # but for float32 rounding, e.g. attention's k_bias (a softmax ignores a shift of every
        # key), whose ~1e-8 noise changes sign when micro-batches reorder the sums.
        atol = 1e-6 * max(np.abs(g).max() for g in jax.tree.leaves(ref_grads))
        for (path, want), got in zip(jax.tree.leaves_with_path(ref_grads), jax.tree.leaves(grads)):
            np.testing.assert_allclose(
                got,
                want,
                rtol=1e-5,
                atol=atol,
                err_msg=f"{jax.tree_util.keystr(path)}, grad_accum_steps={accum}",
            )


def test_task_without_accumulation_declared_is_refused():
    from tests.toy_task import make_toy_task, toy_config

    config = toy_config(grad_accum_steps=2)
    task = make_toy_task(config)
    task.accumulation = "refuse"
    task.accumulation_blocker = "a batch-level term"
    with pytest.raises(ConfigError, match=r"grad_accum_steps=2 .*a batch-level term.*grad_accum_steps=1"):
        trainer.build_train_step(task, optax.sgd(0.1), lambda s: 0.1, config)
