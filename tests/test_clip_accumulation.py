"""Gradient accumulation keeps CLIP's global-batch objective, and tasks whose loss has a
batch-level term refuse it.

The contrastive loss couples every pair of the batch, so a mean over micro-batch losses would see
1/k of the negatives. For every loss kind the trainer's gradient function (`build_grads_fn`, which
runs CLIP's `accum_grads_fn`) must give the full batch's loss, metrics and gradients at
grad_accum_steps = 4, on a mesh with every axis > 1; one test runs the whole jitted train step
(real shardings, state donated) at grad_accum_steps = 2. Params are random values in the model's
shapes, placed in their shardings: equality holds for any params, and no init is compiled.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from core_jax import sharding, trainer
from core_jax.config import ConfigError
from tests.test_clip_train_sharded import tiny_clip_config
from tests.workdirs import random_params

MESH = (2, 2, 2)
BATCH = 16
METRICS = ("i2t_accuracy", "t2i_accuracy", "temperature")


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


def setup(loss_kind):
    """(mesh, global batch, host params in the model's shapes, their shardings): random weights
    with the model's initial temperature (and sigmoid bias), so the logits are as spread as at init."""
    from clip_jax.task import make_task

    config = tiny_config(loss_kind, 1)
    mesh = sharding.make_mesh(config.mesh)
    batch = trainer.make_global_batch(mesh, clip_batch(config, np.random.default_rng(0)))
    boxed = trainer.abstract_boxed_params(make_task(config, None), config, batch)
    params = random_params(boxed, seed=0, scale=0.1)
    m = config.model
    sigmoid = loss_kind.startswith("sigmoid")
    params["logit_scale"] = np.float32(m.sigmoid_scale_init if sigmoid else m.logit_scale_init)
    if sigmoid:
        params["logit_bias"] = np.float32(m.sigmoid_bias_init)
    return mesh, batch, params, sharding.tree_shardings(mesh, boxed)


def assert_grads_close(got, want, what):
    # rtol 1e-5; the atol (1e-6 of the largest gradient entry) is for entries that are zero but for
    # float32 rounding, e.g. attention's k_bias (a softmax ignores a shift of every key), whose
    # ~1e-8 noise changes sign when micro-batches reorder the sums.
    atol = 1e-6 * max(np.abs(g).max() for g in jax.tree.leaves(want))
    for (path, w), g in zip(jax.tree.leaves_with_path(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(
            g, w, rtol=1e-5, atol=atol, err_msg=f"{jax.tree_util.keystr(path)}, {what}"
        )


@pytest.mark.parametrize("loss_kind", ["softmax", "sigmoid", "sigmoid_chunked"])
def test_accumulated_gradients_equal_full_batch(loss_kind):
    from clip_jax.task import make_task

    mesh, batch, host_params, shardings = setup(loss_kind)
    params = jax.device_put(host_params, shardings)

    def loss_metrics_grads(accum):
        config = tiny_config(loss_kind, accum)
        grads_fn = trainer.build_grads_fn(make_task(config, None), config)
        with jax.set_mesh(mesh):
            return jax.device_get(jax.jit(grads_fn)(params, batch, jax.random.key(0), jnp.int32(0)))

    ref_loss, ref_metrics, ref_grads = loss_metrics_grads(1)
    loss, metrics, grads = loss_metrics_grads(4)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg="loss, grad_accum_steps=4")
    for key in METRICS:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    assert_grads_close(grads, ref_grads, "grad_accum_steps=4")


def test_train_step_with_accumulation_equals_full_batch():
    """The jitted train step itself (softmax loss): same loss, metrics, grad_norm and gradients."""
    from clip_jax.task import make_task

    mesh, batch, host_params, _ = setup("softmax")
    tx = grads_in_opt_state()
    config = tiny_config("softmax", 1)
    _, _, shardings = trainer.state_shardings(make_task(config, None), tx, mesh, config, batch)
    state = jax.device_put(
        trainer.TrainState(
            step=np.int32(0),
            params=host_params,
            opt_state=jax.tree.map(np.zeros_like, host_params),
            nonfinite_skipped=np.int32(0),
        ),
        shardings,
    )

    def step_metrics_and_grads(accum):
        config = tiny_config("softmax", accum)
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
    metrics, grads = step_metrics_and_grads(2)
    for key in ("loss", "grad_norm") + METRICS:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    assert_grads_close(grads, ref_grads, "grad_accum_steps=2")


def test_task_without_accumulation_declared_is_refused():
    from tests.toy_task import make_toy_task, toy_config

    config = toy_config(grad_accum_steps=2)
    task = make_toy_task(config)
    task.accumulation = "refuse"
    task.accumulation_blocker = "a batch-level term"
    with pytest.raises(ConfigError, match=r"grad_accum_steps=2 .*a batch-level term.*grad_accum_steps=1"):
        trainer.build_train_step(task, optax.sgd(0.1), lambda s: 0.1, config)
