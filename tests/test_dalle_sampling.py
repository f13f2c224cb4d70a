"""DALL-E sampling: KV cache vs recomputation, guidance, filters, completion, inpainting, sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_jax import sharding
from dalle_jax import masks, sampling
from dalle_jax.transformer import DalleConfig, DalleTransformer, init_params, input_stream, unscan_params


def tiny(kinds, grid=3, **kw):
    return DalleConfig(
        **dict(
            dict(
                text_len=3,
                text_vocab_size=11,
                image_grid=grid,
                image_vocab_size=13,
                d_model=16,
                num_heads=2,
                head_dim=8,
                num_layers=len(kinds),
                mlp_dim=32,
                layer_kinds=tuple(kinds),
                conv_kernel=3,
            ),
            **kw,
        )
    )


def random_params(cfg, seed=0, scale=0.5):
    """Random params of the model's shapes, filled on the host (a jitted init compiles slowly on
    CPU). Large enough that the logits are far from uniform and argmax ties do not occur."""
    rng = np.random.default_rng(seed)
    abstract = nn.meta.unbox(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))

    def fill(path, leaf):
        value = scale * rng.standard_normal(leaf.shape).astype(np.float32)
        return jnp.asarray(value + (1.0 if path[-1].key == "scale" else 0.0))

    return jax.tree_util.tree_map_with_path(fill, abstract)


CFG = tiny(("full", "row"))
PARAMS = random_params(CFG)
TEXT = np.random.default_rng(1).integers(0, CFG.total_text_vocab, (4, CFG.text_len)).astype(np.int32)


def images(cfg, batch, seed=2):
    return np.random.default_rng(seed).integers(
        0, cfg.image_vocab_size, (batch, cfg.num_image_tokens), dtype=np.int32
    )


@pytest.mark.parametrize("kind", masks.KINDS)
def test_cache_equals_no_cache_greedy(kind):
    cfg = tiny((kind, kind), grid=4)
    params = random_params(cfg, seed=3)
    text = TEXT[:2]
    cached = sampling.sample(params, cfg, text, rng=jax.random.key(0), temperature=0)
    recomputed = sampling.sample_no_cache(params, cfg, text, rng=jax.random.key(0), temperature=0)
    assert cached.shape == (2, 16) and cached.dtype == jnp.int32
    np.testing.assert_array_equal(cached, recomputed)
    assert len(np.unique(np.asarray(cached))) > 2  # not a degenerate constant sequence


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize(
    "kinds,legacy",
    [((kind, kind), False) for kind in masks.KINDS] + [(("row", "column", "conv"), True)],
    ids=[*masks.KINDS, "legacy"],
)
def test_cached_logits_equal_recomputed(kinds, legacy, scan):
    """Prefill + one-token decode steps through the KV cache give the logits of the full forward at
    every position, scanned layers (the cache as scan state) or unrolled, for every mask kind."""
    cfg = tiny(kinds, grid=4, conv_kernel=5, scan_layers=scan, legacy_masks=legacy)
    params = random_params(cfg.replace(scan_layers=True), seed=3)
    if not scan:
        params = unscan_params(params, cfg.num_layers)
    ids = jnp.asarray(input_stream(TEXT[:2], images(cfg, 2)))
    full = DalleTransformer(cfg).apply({"params": params}, ids, heads="image")
    model, lt = DalleTransformer(cfg, decode=True), cfg.text_len

    @jax.jit
    def step(cache, tok, pos):
        out, variables = model.apply(
            {"params": params, "cache": cache}, tok, pos, heads="image", mutable=["cache"]
        )
        return out, variables["cache"]

    logits, variables = model.apply({"params": params}, ids[:, : lt + 1], 0, heads="image", mutable=["cache"])
    cache, outs = variables["cache"], [logits]
    for pos in range(lt + 1, cfg.seq_len):
        out, cache = step(cache, ids[:, pos : pos + 1], jnp.int32(pos))
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("legacy", [False, True])
def test_scanned_decode_sampler_equals_no_cache(monkeypatch, legacy):
    """Models deeper than MAX_UNROLLED_LAYERS decode through the scan: same tokens as recomputing."""
    monkeypatch.setattr(sampling, "MAX_UNROLLED_LAYERS", 0)  # read when the sampler is traced
    cfg = tiny(("row", "column", "conv"), grid=4, conv_kernel=5, legacy_masks=legacy)  # traced here only
    params = random_params(cfg, seed=4)
    kw = dict(rng=jax.random.key(0), temperature=0)
    cached = sampling.sample(params, cfg, TEXT[:2], **kw)
    np.testing.assert_array_equal(cached, sampling.sample_no_cache(params, cfg, TEXT[:2], **kw))
    assert len(np.unique(np.asarray(cached))) > 2


def test_guidance_at_one_equals_conditional_and_cache_matches():
    plain = sampling.sample(PARAMS, CFG, TEXT, rng=jax.random.key(7))
    guided = sampling.sample(PARAMS, CFG, TEXT, rng=jax.random.key(7), cond_scale=1.0)
    np.testing.assert_array_equal(plain, guided)
    # s != 1 changes the samples, and the 2B-row cache agrees with recomputation
    g3 = sampling.sample(PARAMS, CFG, TEXT, rng=jax.random.key(7), cond_scale=3.0)
    assert not np.array_equal(g3, plain)
    g3_ref = sampling.sample_no_cache(PARAMS, CFG, TEXT, rng=jax.random.key(7), cond_scale=3.0)
    np.testing.assert_array_equal(g3, g3_ref)


def test_top_k_one_is_greedy():
    greedy = sampling.sample(PARAMS, CFG, TEXT, rng=jax.random.key(0), temperature=0)
    top1 = sampling.sample(PARAMS, CFG, TEXT, rng=jax.random.key(5), top_k=1)
    np.testing.assert_array_equal(greedy, top1)


def test_tiny_top_p_with_guidance_is_greedy_on_the_guided_logits():
    # The nucleus is cut from the guided logits (what the demo's --cond_scale 3 --top_p 0.7 relies on):
    # a nucleus of one token is the argmax of uncond + s (cond - uncond), whatever the rng.
    greedy = sampling.sample(PARAMS, CFG, TEXT, rng=jax.random.key(0), temperature=0, cond_scale=3.0)
    nucleus = sampling.sample(PARAMS, CFG, TEXT, rng=jax.random.key(5), top_p=1e-6, cond_scale=3.0)
    np.testing.assert_array_equal(greedy, nucleus)
    assert not np.array_equal(
        greedy, sampling.sample(PARAMS, CFG, TEXT, rng=jax.random.key(0), temperature=0)
    )


def test_filters_and_guided_logits():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.2, 0.1], [0.05, 0.05, 0.6, 0.3]]))
    kept = lambda x: np.isfinite(np.asarray(x))
    np.testing.assert_array_equal(
        kept(sampling.filter_logits(logits, top_k=2)), [[1, 1, 1, 0], [0, 0, 1, 1]]
    )  # ties at the k-th value are kept
    np.testing.assert_array_equal(
        kept(sampling.filter_logits(logits, top_p=0.65)), [[1, 1, 1, 0], [0, 0, 1, 1]]
    )
    np.testing.assert_array_equal(
        kept(sampling.filter_logits(logits, top_p=0.45)), [[1, 0, 0, 0], [0, 0, 1, 0]]
    )
    np.testing.assert_array_equal(kept(sampling.filter_logits(logits)), np.ones((2, 4)))
    c, u = jnp.array([1.0, 2.0]), jnp.array([0.5, 3.0])
    np.testing.assert_allclose(sampling.guided_logits(c, u, 3.0), u + 3.0 * (c - u))
    np.testing.assert_array_equal(sampling.guided_logits(c, u, 1.0), c)


def test_completion_keeps_rows_and_follows_them():
    given = images(CFG, 4)
    out = np.asarray(sampling.complete(PARAMS, CFG, TEXT, given, rows_kept=1, rng=jax.random.key(3)))
    np.testing.assert_array_equal(out[:, :3], given[:, :3])
    free = np.asarray(sampling.sample(PARAMS, CFG, TEXT, rng=jax.random.key(3)))
    assert not np.array_equal(out, free)  # the kept row conditions what follows
    # variations: each image repeated; kept rows identical, the rest resampled per copy
    var = np.asarray(
        sampling.variations(PARAMS, CFG, TEXT[:2], given[:2], num=2, rows_kept=2, rng=jax.random.key(4))
    )
    assert var.shape == (4, 9)
    np.testing.assert_array_equal(var[:, :6], np.repeat(given[:2, :6], 2, axis=0))


def test_inpainting_changes_only_the_rectangle():
    given = images(CFG, 4)
    box = (1, 1, 2, 2)  # rows 1-2, columns 1-2
    inside = ~sampling.rectangle_mask(3, *box)
    assert inside.sum() == 4 and inside.reshape(3, 3)[1:, 1:].all()
    out = np.asarray(sampling.inpaint(PARAMS, CFG, TEXT, given, box, rng=jax.random.key(9)))
    np.testing.assert_array_equal(out[:, ~inside], given[:, ~inside])
    assert not np.array_equal(out[:, inside], given[:, inside])
    # teacher forcing through the cache gives the reference's tokens
    kw = dict(rng=jax.random.key(0), temperature=0, prefix_image_tokens=given, known_mask=~inside)
    np.testing.assert_array_equal(
        sampling.sample(PARAMS, CFG, TEXT, **kw), sampling.sample_no_cache(PARAMS, CFG, TEXT, **kw)
    )


def test_sharded_sampling_equals_unsharded():
    boxed = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0)))
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    params = jax.device_put(PARAMS, nn.meta.unbox(sharding.tree_shardings(mesh, boxed)))
    text = jax.device_put(TEXT, sharding.batch_sharding(mesh, 2))
    ref = sampling.sample(PARAMS, CFG, TEXT, rng=jax.random.key(7), cond_scale=3.0)
    with jax.set_mesh(mesh):
        out = sampling.sample(params, CFG, text, rng=jax.random.key(7), cond_scale=3.0)
    assert out.sharding.spec[0] == ("data", "fsdp")  # rows stay split over the batch axes
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=100), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(prefix_image_tokens=np.zeros((4, 9), np.int32)), "go together"),
        (dict(prefix_image_tokens=np.zeros((4, 8), np.int32), known_mask=np.ones(9, bool)), "shape"),
        (dict(prefix_image_tokens=np.full((4, 9), 13, np.int32), known_mask=np.ones(9, bool)), r"\[0, 13\)"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sampling.sample(PARAMS, CFG, TEXT, rng=jax.random.key(0), **kwargs)


def test_bad_text():
    with pytest.raises(ValueError, match="text_tokens must be int"):
        sampling.sample(PARAMS, CFG, TEXT[:, :2], rng=jax.random.key(0))
    with pytest.raises(ValueError, match="text_tokens must lie"):
        sampling.sample(PARAMS, CFG, TEXT + 100, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="rectangle"):
        sampling.rectangle_mask(3, 2, 2, 2, 2)
    with pytest.raises(ValueError, match="rows_kept"):
        sampling.completion_mask(3, 4)
