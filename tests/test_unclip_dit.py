"""The DiT decoder network (model.architecture='dit'): starts as the identity (adaLN-Zero), counts
its FLOPs exactly, gives the one-device output on a (2, 2, 2) mesh, trains through the decoder task,
loads and samples through the API, and refuses configs it cannot build."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_jax import sharding, trainer
from core_jax.errors import ConfigError
from dalle_jax.unclip import decoder_task, dit, unet
from dalle_jax.unclip.api import Decoder
from dalle_jax.unclip.diffusion_task import network, train_flops_per_example
from tests.test_unclip_unet import matmul_flops
from tests.testfiles import load_config
from tests.workdirs import random_params, tiny_clip_workdir

SPEC = dit.DiTSpec(image_size=8, patch_size=2, width=16, depth=2, num_heads=2, clip_dim=12, text_width=10)
STEPS, LEARNING_RATE = 3, 3e-3


def inputs(batch=2, size=8, text=5):
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (batch, size, size, 3))
    t = jnp.arange(batch, dtype=jnp.float32) * 300.0
    clip = jax.random.normal(keys[1], (batch, SPEC.clip_dim))
    states = jax.random.normal(keys[2], (batch, text, SPEC.text_width))
    mask = jnp.arange(text)[None] < jnp.array([[text], [2]] * batch)[:batch]  # odd rows keep 2 tokens
    return x, t, clip, states, mask


def test_starts_as_the_identity_and_reads_every_input():
    model = dit.DiT(SPEC)
    params = nn.meta.unbox(unet.init_params(model, jax.random.key(0)))
    fresh = jax.jit(lambda *a: model.apply({"params": params}, *a))
    for size in (8, 16):  # any multiple of the patch runs on the same params
        out = fresh(*inputs(size=size))
        assert out.shape == (2, size, size, 3) and not np.any(np.asarray(out))
    # With the zero-initialised layers given values, each input moves the output.
    live = random_params(unet.abstract_params(model), 0, 0.2)
    apply = jax.jit(lambda *a: model.apply({"params": live}, *a))  # one compile for the calls below
    base = np.asarray(apply(*inputs()))
    x, t, clip, states, mask = inputs()
    for changed in (
        (x, t + 1.0, clip, states, mask),
        (x, t, clip * 0.0, states, mask),
        (x, t, clip, states.at[0, 0].add(1.0), mask),
        (x.at[:, 0, 0].add(1.0), t, clip, states, mask),
    ):
        assert np.abs(np.asarray(apply(*changed)) - base).max() > 1e-4
    # A masked caption token does not matter (row 1 keeps its first 2 of 5 tokens).
    hidden = apply(x, t, clip, states.at[1, 4].add(5.0), mask)
    np.testing.assert_array_equal(np.asarray(hidden)[1], base[1])


def test_flops_count_every_matmul():
    model = dit.DiT(SPEC)
    params = nn.meta.unbox(unet.abstract_params(model))
    x, t, clip, states, mask = inputs()
    jaxpr = jax.make_jaxpr(lambda p, *a: model.apply({"params": p}, *a))(params, x, t, clip, states, mask)
    assert dit.forward_flops(SPEC, 8, 5) * 2 == matmul_flops(getattr(jaxpr, "jaxpr", jaxpr))
    assert train_flops_per_example(SPEC, 5) == 3 * dit.forward_flops(SPEC, text_length=5)


def dit_config(clip_workdir, mesh=(1, 1, 1), **model):
    c = load_config("unclip_decoder_shapes")
    c.model.architecture = "dit"
    c.model.image_size, c.model.eval_max_batches = 8, 0
    c.model.dit.update(dict(patch_size=2, width=16, depth=1, num_heads=2))
    c.model.update(model)
    c.batch_size, c.total_steps, c.log_every = 8, STEPS, 1
    c.eval_every, c.checkpoint_every = 1000, STEPS
    c.optim.warmup_steps, c.optim.learning_rate = 1, LEARNING_RATE
    c.sample.preview_images = 0
    c.data.shapes_train_size = 64
    c.ema_decay = 0.9
    c.clip_workdir = clip_workdir
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return c


def test_sharded_forward_equals_one_device():
    """Params placed by the rules table over a (2, 2, 2) mesh give the one-device output up to
    float32 reassociation; a wrong shard or a missing reduction is off by O(1)."""
    model = dit.DiT(SPEC)
    boxed = unet.abstract_params(model)
    params = jax.tree.map(jnp.asarray, random_params(boxed, 1, 0.2))
    apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    args = inputs(batch=4)
    ref = np.asarray(apply(params, *args))
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    shardings = nn.meta.unbox(sharding.tree_shardings(mesh, boxed))
    P = jax.sharding.PartitionSpec
    assert shardings["block_0"]["attn"]["q_kernel"].spec == P("fsdp", "tensor")  # [embed, heads, kv]
    assert shardings["block_0"]["mlp"]["fc_kernel"].spec == P("fsdp", "tensor")
    batch = [jax.device_put(a, sharding.batch_sharding(mesh, a.ndim)) for a in args]
    with jax.set_mesh(mesh):
        out = apply(jax.device_put(params, shardings), *batch)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=2e-5)


def test_trains_through_the_decoder_task_and_samples(tmp_path):
    clip_workdir = tiny_clip_workdir(str(tmp_path / "clip"), image_size=16)
    workdir, config = str(tmp_path / "dit"), dit_config(clip_workdir)
    task = decoder_task.make_task(config, workdir)
    spec = network(config, **decoder_task.conditioning_sizes(config)).spec  # sizes resolved from the CLIP
    assert task.flops_per_example == train_flops_per_example(spec, int(config.model.text_length))
    trainer.train(config, workdir, task, devices=jax.devices()[:1], log_fn=lambda _: None)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    decoder = Decoder.load(workdir)
    assert isinstance(decoder.model, dit.DiT)
    images = decoder.decode(np.eye(2, decoder.model.spec.clip_dim, dtype=np.float32), sampler="ddim", steps=2)
    assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(architecture="transformer"), "architecture"),
        (dict(dropout=0.1), "dropout"),
        (dict(image_size=9), "patch_size"),
    ],
)
def test_config_errors_name_the_key(change, key):
    config = dit_config("")
    config.model.update(change)
    with pytest.raises(ConfigError, match=key):
        network(config, clip_dim=4, text_width=4)
    with pytest.raises(ConfigError, match="num_heads"):
        dit.check_dit_spec(dataclasses.replace(SPEC, num_heads=3))
