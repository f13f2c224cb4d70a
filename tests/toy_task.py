"""A tiny classifier on the shapes suite that exercises the shared trainer like a real model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from core_jax import sharding, trainer
from core_jax.config import base_config, lock
from core_jax.data.shapes import COLOURS


class ToyClassifier(nn.Module):
    width: int = 32
    hidden: int = 64
    classes: int = 6

    @nn.compact
    def __call__(self, image):
        b = image.shape[0]
        x = image.reshape(b, 16, 4, 16, 4, 3).mean((2, 4)).reshape(b, -1)  # 64x64 -> 16x16
        x = sharding.constrain(x, ("act_batch", None))
        w_in = self.param(
            "w_in",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, "embed")),
            (x.shape[-1], self.width),
        )
        h = x @ w_in
        w1 = self.param(
            "w1",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
            (self.width, self.hidden),
        )
        b1 = self.param("b1", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), (self.hidden,))
        h = sharding.constrain(nn.gelu(h @ w1 + b1), ("act_batch", "act_mlp"))
        w2 = self.param(
            "w2",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")),
            (self.hidden, self.width),
        )
        h = h @ w2
        w_out = self.param(
            "w_out",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "vocab")),
            (self.width, self.classes),
        )
        return h @ w_out


def toy_config(**overrides):
    c = base_config()
    c.total_steps = 6
    c.batch_size = 16
    c.log_every = 1
    c.checkpoint_every = 3
    c.eval_every = 1000
    c.optim.learning_rate = 1e-2
    c.optim.warmup_steps = 2
    c.data.shapes_train_size = 512
    c.mesh.data = -1
    c.task = "tests.toy_task"
    for k, v in overrides.items():
        node = c
        *parents, last = k.split(".")
        for p in parents:
            node = node[p]
        node[last] = v
    return lock(c)


make_task = lambda config, workdir: make_toy_task(config, workdir)  # noqa: E731  (core_jax.aot entry)


def get_config(arg=None):
    """toy_config() as a config file (`--config tests/toy_task.py`, tests/fault_worker.py)."""
    return toy_config()


def make_toy_task(config, workdir=None, poison_step=None, width=32, poison_steps=()):
    """`poison_step` / `poison_steps`: steps whose loss is NaN."""
    model = ToyClassifier(width=width)

    def example_fn(raw, rng):
        img = raw["image"].astype(np.float32) / 255.0
        # Colour of the first object: defined for every scene, so the loss is a plain mean.
        label = list(COLOURS).index(raw["objects"][0]["colour"])
        return {"image": img, "label": np.int32(label)}

    def init_fn(rng, batch):
        return model.init(rng, batch["image"])

    def loss_fn(params, batch, rng, step):
        logits = model.apply({"params": params}, batch["image"])
        valid = batch["label"] >= 0
        labels = jnp.where(valid, batch["label"], 0)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1)[:, 0]
        loss = jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1)
        poisoned = tuple(poison_steps) + (() if poison_step is None else (poison_step,))
        if poisoned:
            loss = jnp.where(jnp.isin(step, jnp.asarray(poisoned)), jnp.nan, loss)
        acc = jnp.sum((logits.argmax(-1) == labels) * valid) / jnp.maximum(valid.sum(), 1)
        return loss, {"accuracy": acc}

    def batch_spec(batch_size):
        return {
            "image": jax.ShapeDtypeStruct((batch_size, 64, 64, 3), jnp.float32),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
        }

    flops = 2 * 3 * (768 * width + width * 64 + 64 * width + width * 6)
    return trainer.Task(
        init_fn=init_fn,
        loss_fn=loss_fn,
        example_fn=example_fn,
        flops_per_example=flops,
        batch_spec=batch_spec,
        accumulation="mean",
    )


def counting_inits(task, inits: list):
    """`task` with an init that appends to `inits` each time it runs (not when it is only traced)."""
    init_fn = task.init_fn

    def init(rng, batch):
        jax.debug.callback(lambda: inits.append(1))
        return init_fn(rng, batch)

    task.init_fn = init
    return task
