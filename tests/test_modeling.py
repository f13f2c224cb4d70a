"""core_jax.modeling: dense (one 2-D matmul on CPU) and layer_stack's unrolled scan."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from core_jax import sharding
from core_jax.modeling import dense, layer_stack


def _inputs(x_shape, k_shape, seed=0):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=x_shape), jnp.float32),
        jnp.asarray(rng.normal(size=k_shape), jnp.float32),
    )


@pytest.mark.parametrize(
    "x_shape,k_shape,in_dims,spec",
    [
        ((3, 5, 8), (8, 2, 4), 1, "bsd,dhk->bshk"),  # q/k/v projection
        ((3, 5, 2, 4), (2, 4, 8), 2, "bshk,hkd->bsd"),  # attention output
        ((2, 4, 4, 6), (6, 7), 1, "bhwc,cd->bhwd"),  # 1x1 conv
    ],
)
def test_dense_equals_einsum_in_value_and_gradient(x_shape, k_shape, in_dims, spec):
    x, k = _inputs(x_shape, k_shape)
    np.testing.assert_allclose(dense(x, k, in_dims), jnp.einsum(spec, x, k), rtol=1e-5, atol=1e-5)
    cot = jnp.asarray(np.random.default_rng(1).normal(size=jnp.einsum(spec, x, k).shape), jnp.float32)
    g_dense = jax.grad(lambda x, k: jnp.sum(dense(x, k, in_dims) * cot), argnums=(0, 1))(x, k)
    g_ref = jax.grad(lambda x, k: jnp.sum(jnp.einsum(spec, x, k) * cot), argnums=(0, 1))(x, k)
    for a, b in zip(g_dense, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_dense_accelerator_form_is_the_same_contraction(monkeypatch):
    # TPU/GPU keep the multi-dim dot_general; on this CPU test host, force that branch.
    x, k = _inputs((3, 5, 2, 4), (2, 4, 8))
    cpu = dense(x, k, 2)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    np.testing.assert_allclose(dense(x, k, 2), cpu, rtol=1e-5, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(lambda x, k: dense(x, k, 2))(x, k))
    assert "reshape" not in jaxpr and "dot_general" in jaxpr


def test_dense_names_mismatched_dims():
    x, k = _inputs((2, 3, 8), (6, 4))
    with pytest.raises(ValueError, match=r"input dims \(8,\) do not match the kernel's \(6,\)"):
        dense(x, k)


def test_dense_keeps_the_batch_and_tensor_shardings():
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    x, k = _inputs((8, 5, 16), (16, 4, 4))
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
    ks = jax.device_put(k, NamedSharding(mesh, P("fsdp", "tensor")))
    out = jax.jit(lambda x, k: dense(x, k))(xs, ks)
    np.testing.assert_allclose(out, jnp.einsum("bsd,dhk->bshk", x, k), rtol=1e-5, atol=1e-5)
    # rows stay split over the data-parallel devices, heads over the tensor ones
    shard_shapes = {s.data.shape for s in out.addressable_shards}
    assert shard_shapes == {(2, 5, 2, 4)}, shard_shapes


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + jnp.tanh(nn.Dense(x.shape[-1])(x))


@pytest.mark.parametrize("unroll", [2, 3, 8])
def test_scan_unroll_keeps_params_and_values_and_drops_the_loop(unroll):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32)
    looped = layer_stack(_Block, 3, scan=True)
    unrolled = layer_stack(_Block, 3, scan=True, unroll=unroll)
    params = looped.init(jax.random.key(0), x)
    same_init = unrolled.init(jax.random.key(0), x)
    jax.tree.map(np.testing.assert_array_equal, params, same_init)  # same layout, same values

    def loss(module):
        return lambda p: jnp.sum(jnp.square(module.apply(p, x)))

    np.testing.assert_allclose(unrolled.apply(params, x), looped.apply(params, x), rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        jax.grad(loss(unrolled))(params),
        jax.grad(loss(looped))(params),
    )
    if unroll >= 3:  # the whole stack unrolled: the compiled step has no loop (the looped one has)
        hlo = {
            name: jax.jit(jax.grad(loss(m))).lower(params).as_text()
            for name, m in (("looped", looped), ("unrolled", unrolled))
        }
        assert "while" in hlo["looped"] and "while" not in hlo["unrolled"]


def test_scan_unroll_must_be_positive():
    from core_jax.config import ConfigError, base_config, validate

    c = base_config()
    c.scan_unroll = 0
    with pytest.raises(ConfigError, match="scan_unroll must be >= 1"):
        validate(c, 1, 1)


def test_shapes_configs_unroll_every_layer_and_follow_overrides():
    from core_jax.app import load_config

    dalle = load_config("dalle_shapes")
    assert dalle.scan_layers and dalle.scan_unroll == dalle.model.num_layers == 4
    dalle.model.num_layers = 6
    assert dalle.scan_unroll == 6
    clip = load_config("clip_shapes")
    assert clip.scan_unroll == clip.model.vision_layers == clip.model.text_layers == 4
    clip.scan_unroll = 1  # overriding the unroll alone leaves the model alone
    assert clip.model.vision_layers == 4
