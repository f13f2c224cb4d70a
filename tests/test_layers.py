"""Shared transformer layers (core_jax/layers.py): the models' param trees as converters and
checkpoints know them, the causal mask, a mask table through the KV cache, norms and the MLP."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import model as clip_model
from core_jax import layers
from dalle_jax import transformer
from tests.testfiles import load_config


def tree_of(boxed):
    """{path: (shape, logical axes)} of boxed params."""
    flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    return {
        "/".join(p.key for p in path): (tuple(leaf.value.shape), tuple(leaf.names)) for path, leaf in flat
    }


def scanned_block(prefix, layers_, d, heads, kv, mlp, qkv, norms, mlp_names):
    """A scanned block's leaves, written out from the layouts the converters read."""
    L, b = layers_, f"{prefix}/scan/block/"
    tree = {}
    for name in qkv:
        tree[f"{b}attn/{name}_kernel"] = ((L, d, heads, kv), ("layers", "embed", "heads", "kv"))
        tree[f"{b}attn/{name}_bias"] = ((L, heads, kv), ("layers", "heads", "kv"))
    tree[f"{b}attn/out_kernel"] = ((L, heads, kv, d), ("layers", "heads", "kv", "embed"))
    tree[f"{b}attn/out_bias"] = ((L, d), ("layers", "norm"))
    for norm in norms:
        tree[f"{b}{norm}/scale"] = tree[f"{b}{norm}/bias"] = ((L, d), ("layers", "norm"))
    fc, proj = mlp_names
    tree[f"{b}mlp/{fc}_kernel"] = ((L, d, mlp), ("layers", "embed", "mlp"))
    tree[f"{b}mlp/{fc}_bias"] = ((L, mlp), ("layers", "mlp"))
    tree[f"{b}mlp/{proj}_kernel"] = ((L, mlp, d), ("layers", "mlp", "embed"))
    tree[f"{b}mlp/{proj}_bias"] = ((L, d), ("layers", "norm"))
    return tree


def test_clip_b32_param_tree():
    boxed = clip_model.abstract_params(clip_model.clip_from_config(load_config("clip_vit_b32")))
    clip_block = dict(qkv=("q", "k", "v"), norms=("ln_1", "ln_2"), mlp_names=("fc", "proj"))
    want = {
        "logit_scale": ((), ()),
        "text/ln_final/scale": ((512,), ("norm",)),
        "text/ln_final/bias": ((512,), ("norm",)),
        "text/positional_embedding": ((77, 512), ("length", "embed")),
        "text/text_projection": ((512, 512), ("embed", None)),
        "text/token_embedding": ((49408, 512), ("vocab", "embed")),
        "visual/class_embedding": ((768,), ("norm",)),
        "visual/ln_pre/scale": ((768,), ("norm",)),
        "visual/ln_pre/bias": ((768,), ("norm",)),
        "visual/ln_post/scale": ((768,), ("norm",)),
        "visual/ln_post/bias": ((768,), ("norm",)),
        "visual/patch_kernel": ((3072, 768), ("patch", "embed")),
        "visual/positional_embedding": ((50, 768), ("length", "embed")),
        "visual/proj": ((768, 512), ("embed", None)),
        **scanned_block("text/transformer", 12, 512, 8, 64, 2048, **clip_block),
        **scanned_block("visual/transformer", 12, 768, 12, 64, 3072, **clip_block),
    }
    assert tree_of(boxed) == want


def test_dalle_shapes_param_tree():
    config = load_config("dalle_shapes")
    config.model.text_vocab_size = 100  # set from the tokenizer in a run
    cfg = transformer.DalleConfig.from_config(config)
    boxed = jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.key(0)))
    want = {
        "bos": ((128,), ("embed",)),
        "text_embedding": ((116, 128), ("vocab", "embed")),
        "image_embedding": ((256, 128), ("vocab", "embed")),
        "text_position": ((17, 128), ("length", "embed")),
        "image_row_position": ((8, 128), ("length", "embed")),
        "image_column_position": ((8, 128), ("length", "embed")),
        "ln_final/scale": ((128,), ("norm",)),
        "ln_final/bias": ((128,), ("norm",)),
        "text_head_kernel": ((128, 116), ("embed", "vocab")),
        "text_head_bias": ((116,), ("vocab",)),
        "image_head_kernel": ((128, 256), ("embed", "vocab")),
        "image_head_bias": ((256,), ("vocab",)),
        **scanned_block(
            "layers",
            4,
            128,
            4,
            32,
            512,
            qkv=("query", "key", "value"),
            norms=("ln_attn", "ln_mlp"),
            mlp_names=("in", "out"),
        ),
    }
    assert tree_of(boxed) == want


def attention_params(attn, x, seed=0):
    """Init's tree filled with large random values (biases too), so every path matters."""
    abstract = nn.meta.unbox(jax.eval_shape(lambda: attn.init(jax.random.key(0), x)["params"]))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), jnp.float32), abstract)


@pytest.mark.parametrize("causal", [True, False])
def test_causal_mask(causal):
    attn = layers.Attention(num_heads=2, out_std=0.2, causal=causal)
    x = np.random.default_rng(2).normal(size=(2, 6, 16)).astype(np.float32)
    params = {"params": attention_params(attn, x)}
    x2 = x.copy()
    x2[:, 4:] += 1.0  # change the last two positions
    y, y2 = attn.apply(params, x), attn.apply(params, x2)
    assert np.allclose(y[:, :4], y2[:, :4], atol=1e-6) == causal  # without the mask it leaks back
    assert not np.allclose(y[:, 4:], y2[:, 4:], atol=1e-4)
    # An explicit mask combines with the triangle: hiding key 1 from every row hides x[:, 1] from
    # every other position (row 1's own query still reads it).
    mask = np.ones((6, 6), bool)
    mask[:, 1] = False
    x3 = x.copy()
    x3[:, 1] += 1.0
    others = [0, 2, 3, 4, 5]
    y, y3 = attn.apply(params, x, mask), attn.apply(params, x3, mask)
    np.testing.assert_array_equal(y[:, others], y3[:, others])
    assert not np.allclose(attn.apply(params, x)[:, others], attn.apply(params, x3)[:, others], atol=1e-4)


def random_masks(kinds, length, seed):
    """[kinds, T, T] causal masks with random holes; the diagonal stays visible."""
    rng = np.random.default_rng(seed)
    table = np.tril(rng.random((kinds, length, length)) < 0.6) | np.eye(length, dtype=bool)
    return jnp.asarray(table)


@pytest.mark.parametrize("causal", [False, True], ids=["mask_table", "causal"])
def test_cache_equals_recompute(causal):
    """Prefill + one-token steps through the KV cache give the outputs of the no-cache call over
    the whole sequence, with the mask table row a layer picks by index (or the causal triangle)."""
    T, prefill, heads, head_dim = 7, 3, 2, 4
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, T, 12)), jnp.float32)
    kw = dict(
        num_heads=heads,
        head_dim=head_dim,
        out_std=0.3,
        names=("query", "key", "value"),
        float32_logits=True,
        causal=causal,
    )
    full_attn, cached_attn = layers.Attention(**kw), layers.Attention(**kw, cache_length=T)
    params = attention_params(full_attn, x)
    table, kind = random_masks(3, T, seed=4), jnp.int32(2)
    mask = None if causal else table[kind]
    full = full_attn.apply({"params": params}, x, mask)
    out, variables = cached_attn.apply({"params": params}, x[:, :prefill], mask, 0, mutable=["cache"])
    outs, cache = [out], variables["cache"]
    assert cache["key"].shape == cache["value"].shape == (2, heads, T, head_dim)
    step = jax.jit(
        lambda cache, x, pos: cached_attn.apply(
            {"params": params, "cache": cache}, x, mask, pos, mutable=["cache"]
        )
    )
    for pos in range(prefill, T):
        out, variables = step(cache, x[:, pos : pos + 1], jnp.int32(pos))
        outs.append(out)
        cache = variables["cache"]
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)
    if not causal:  # the table's row matters: another kind's mask gives other outputs
        other = full_attn.apply({"params": params}, x, table[0])
        assert not np.allclose(other, full, atol=1e-3)


def test_logit_rounding_same_maths():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 24)), jnp.float32)
    attn = layers.Attention(num_heads=2, out_std=0.3, causal=True)
    params = {"params": attention_params(attn, x)}
    np.testing.assert_allclose(
        attn.apply(params, x), attn.clone(float32_logits=True).apply(params, x), rtol=1e-5, atol=1e-5
    )


def test_layer_norms():
    x = np.random.default_rng(5).normal(2.0, 3.0, size=(3, 16)).astype(np.float32)
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    for norm in (layers.LayerNorm(), layers.flax_layer_norm(1e-5, jnp.float32, "ln")):
        variables = norm.init(jax.random.key(0), x)
        assert tree_of(variables["params"]) == {"scale": ((16,), ("norm",)), "bias": ((16,), ("norm",))}
        np.testing.assert_allclose(norm.apply(variables, x), want, rtol=1e-4, atol=1e-5)
    # bfloat16 activations: statistics in float32, output in the compute dtype.
    norm = layers.LayerNorm(dtype=jnp.bfloat16)
    variables = norm.init(jax.random.key(0), x)
    y = norm.apply(variables, jnp.asarray(x, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=0.05)


def test_mlp_names_and_activations():
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3, 8)), jnp.float32)
    mlp = layers.MLP(mlp_dim=16, activation="gelu_tanh", in_std=0.5, out_std=0.5, names=("in", "out"))
    variables = mlp.init(jax.random.key(0), x)
    assert set(variables["params"]) == {"in_kernel", "in_bias", "out_kernel", "out_bias"}
    p = nn.meta.unbox(variables["params"])
    hidden = nn.gelu(x @ p["in_kernel"] + p["in_bias"], approximate=True)
    np.testing.assert_allclose(
        mlp.apply(variables, x), hidden @ p["out_kernel"] + p["out_bias"], rtol=1e-5, atol=1e-6
    )
    erf = layers.ACTIVATIONS["gelu"](x)
    assert np.abs(np.asarray(erf) - np.asarray(nn.gelu(x, approximate=True))).max() > 1e-5
    with pytest.raises(ValueError, match="activation"):
        mlp.clone(activation="relu").init(jax.random.key(0), x)


def test_sincos_2d_positions_by_hand():
    # grid 2 x 3, width 8: frequencies 1 and 1/100; channels sin x, cos x, sin y, cos y (x = column).
    table = np.asarray(layers.sincos_2d(2, 3, 8))
    assert table.shape == (6, 8) and table.dtype == np.float32
    x, y = 2.0, 1.0  # patch 5 of the row-major grid: row 1, column 2
    want = [np.sin(x), np.sin(x / 100), np.cos(x), np.cos(x / 100)]
    want += [np.sin(y), np.sin(y / 100), np.cos(y), np.cos(y / 100)]
    np.testing.assert_allclose(table[5], want, atol=1e-6)
    np.testing.assert_allclose(table[0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)
    assert len({row.tobytes() for row in np.asarray(layers.sincos_2d(4, 4, 16))}) == 16
    with pytest.raises(ValueError, match="multiple of 4"):
        layers.sincos_2d(2, 2, 6)
