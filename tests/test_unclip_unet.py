"""unCLIP networks: the U-Net's shapes, conditioning and masks, its sharded forward, the shared
Attention's context, the paper sizes, the FLOP count and CLIP's per-token text states."""

import dataclasses
import functools
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import defaults
from clip_jax import model as clip_model
from core_jax import layers, sharding
from core_jax.errors import ConfigError
from dalle_jax.unclip import unet, unet_spec
from dalle_jax.unclip.unet_spec import UNetSpec

SIZE, TEXT, CLIP_DIM, TEXT_WIDTH = 16, 5, 12, 10
# A decoder in miniature: two levels (16x16, 8x8), attention at 8x8 (and the middle), CLIP tokens
# and a caption; and an upsampler: three levels, no attention, a low-resolution image.
DECODER = UNetSpec(
    model_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    image_size=SIZE,
    attention_resolutions=(8,),
    head_channels=8,
    norm_groups=8,
    clip_dim=CLIP_DIM,
    text_width=TEXT_WIDTH,
    dropout=0.1,
)
UPSAMPLER = UNetSpec(
    model_channels=8,
    channel_mult=(1,),
    num_res_blocks=1,
    image_size=SIZE,
    norm_groups=4,
    low_res_channels=3,
)
BATCH = 4  # divisible by data * fsdp of the (2, 2, 2) mesh; one compile serves every test


@functools.cache
def random_params(spec, seed=0):
    """Random params in the model's tree, zero-initialised layers included (so every path matters),
    drawn with numpy: a Flax init compiles the threefry RNG, seconds on 2 cores. Shared by the
    tests, which do not modify them."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "scale":
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        if "bias" in name:
            return (0.1 * rng.standard_normal(shape)).astype(np.float32)
        if len(shape) == 3:  # attention: [in, heads, kv] or out [heads, kv, out]
            fan_in = shape[0] * shape[1] if name == "out_kernel" else shape[0]
        else:
            fan_in = math.prod(shape[:-1])
        return (fan_in**-0.5 * rng.standard_normal(shape)).astype(np.float32)

    abstract = nn.meta.unbox(unet.abstract_params(unet.unet_from_spec(spec)))
    return jax.tree_util.tree_map_with_path(draw, abstract)


def decoder_inputs(seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, SIZE, SIZE, 3)).astype(np.float32)
    t = rng.uniform(0, 1000, BATCH).astype(np.float32)
    clip = rng.standard_normal((BATCH, CLIP_DIM)).astype(np.float32)
    states = rng.standard_normal((BATCH, TEXT, TEXT_WIDTH)).astype(np.float32)
    mask = np.arange(TEXT)[None] < np.array([3, 5, 1, 4])[:, None]  # row 0: tokens 3, 4 masked
    return x, t, clip, states, mask


@jax.jit
def apply_decoder(params, x, t, clip, states, mask):
    return unet.UNet(DECODER).apply({"params": params}, x, t, clip, states, mask)


def test_shapes_and_zero_init():
    """Output shape = input shape for the decoder and the upsampler (whose low-res input is a
    quarter of the size); a real init starts at exactly zero (zero-initialised output conv)."""
    x, t, clip, states, mask = decoder_inputs()
    out = apply_decoder(random_params(DECODER), x, t, clip, states, mask)
    assert out.shape == x.shape and out.dtype == jnp.float32 and np.isfinite(out).all()

    model = unet.unet_from_spec(UPSAMPLER)
    low_res = np.random.default_rng(2).standard_normal((BATCH, SIZE // 4, SIZE // 4, 3)).astype(np.float32)
    apply = jax.jit(lambda p, lr: model.apply({"params": p}, x, t, low_res=lr))
    params = random_params(UPSAMPLER)
    out = apply(params, low_res)
    assert out.shape == x.shape and np.isfinite(out).all()
    assert not np.allclose(out, apply(params, low_res + 1.0), atol=1e-3)  # it reads the low-res image
    with jax.threefry_partitionable(False):
        init = nn.meta.unbox(jax.jit(unet.init_params, static_argnums=0)(model, jax.random.key(0)))
    assert jax.tree.structure(init) == jax.tree.structure(params)
    np.testing.assert_array_equal(apply(init, low_res), 0.0)


def test_context_and_masked_caption_tokens():
    params = random_params(DECODER)
    x, t, clip, states, mask = decoder_inputs()
    base = np.asarray(apply_decoder(params, x, t, clip, states, mask))
    # The CLIP embedding and a visible caption token change the output.
    assert not np.allclose(base, apply_decoder(params, x, t, clip * 0.5, states, mask), atol=1e-4)
    visible = states.copy()
    visible[0, 1] += 1.0
    changed = np.asarray(apply_decoder(params, x, t, clip, visible, mask))
    assert not np.allclose(base[0], changed[0], atol=1e-4)
    np.testing.assert_array_equal(base[1:], changed[1:])  # examples do not mix
    # A masked token's state is not read at all: bit-identical output.
    hidden = states.copy()
    hidden[0, 3:] = 100.0 * np.random.default_rng(3).standard_normal((2, TEXT_WIDTH))
    np.testing.assert_array_equal(base, apply_decoder(params, x, t, clip, hidden, mask))


def test_guidance_dropout_inputs():
    """A zero CLIP embedding with an all-masked caption is a valid input (the CLIP tokens and the
    spatial keys stay attendable), ignores the caption, and differs from the conditioned output."""
    params = random_params(DECODER)
    x, t, clip, states, mask = decoder_inputs()
    none = np.zeros_like(mask)
    null = np.asarray(apply_decoder(params, x, t, np.zeros_like(clip), states, none))
    assert np.isfinite(null).all()
    np.testing.assert_array_equal(null, apply_decoder(params, x, t, np.zeros_like(clip), states * 3.0, none))
    assert not np.allclose(null, apply_decoder(params, x, t, clip, states, mask), atol=1e-4)


def test_remat_and_bfloat16():
    """Rematerialised blocks (static flags and context arguments through the remat) in bfloat16:
    near the float32 output, returned as float32."""
    params = random_params(DECODER)
    x, t, clip, states, mask = decoder_inputs()
    ref = np.asarray(apply_decoder(params, x, t, clip, states, mask))
    model = unet.UNet(dataclasses.replace(DECODER, remat="full", dtype="bfloat16"))
    out = jax.jit(lambda p: model.apply({"params": p}, x, t, clip, states, mask))(params)
    assert out.dtype == jnp.float32
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_sharded_forward_equals_one_device():
    """Params sharded by the rules over a (2, 2, 2) mesh: the same output as on one device, up to
    float32 reassociation (sums split over fsdp / tensor shards, then all-reduced: about 3e-6 on
    outputs of size ~3 here; a wrong shard or a missing reduction is off by O(1))."""
    params = random_params(DECODER)
    x, t, clip, states, mask = decoder_inputs()
    ref = apply_decoder(params, x, t, clip, states, mask)
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    boxed = unet.abstract_params(unet.unet_from_spec(DECODER))
    shardings = nn.meta.unbox(sharding.tree_shardings(mesh, boxed))
    specs = flax.traverse_util.flatten_dict(shardings)
    P = jax.sharding.PartitionSpec
    assert specs[("up_1_res_0", "in_conv", "kernel")].spec == P(None, None, "fsdp", "tensor")
    assert specs[("middle_attn", "attn", "context_k_kernel")].spec == P("fsdp", "tensor")
    sharded = jax.device_put(params, shardings)
    assert sharded["up_1_res_0"]["in_conv"]["kernel"].sharding.spec == P(None, None, "fsdp", "tensor")
    batch = [jax.device_put(a, sharding.batch_sharding(mesh, a.ndim)) for a in (x, t, clip, states, mask)]
    with jax.set_mesh(mesh):
        out = apply_decoder(sharded, *batch)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-5)


def attention_params(attn, x, **kwargs):
    abstract = nn.meta.unbox(jax.eval_shape(lambda: attn.init(jax.random.key(0), x, **kwargs)["params"]))
    rng = np.random.default_rng(4)
    return jax.tree.map(lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), jnp.float32), abstract)


def test_attention_context():
    """Without a context the shared Attention keeps its params; with one it attends over the
    positions' and the context's keys (the softmax written out); a fully masked context leaves the
    plain self-attention."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 6, 16)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((2, 3, 10)), jnp.float32)
    context_mask = jnp.asarray([[True, False, True], [True, True, True]])
    attn = layers.Attention(num_heads=2, out_std=0.2)
    plain = set(nn.meta.unbox(jax.eval_shape(lambda: attn.init(jax.random.key(0), x)["params"])))
    assert plain == {f"{n}_{p}" for n in ("q", "k", "v", "out") for p in ("kernel", "bias")}
    params = attention_params(attn, x, context=context)
    assert set(params) == plain | {f"context_{n}_{p}" for n in ("k", "v") for p in ("kernel", "bias")}

    apply = jax.jit(lambda p, m: attn.apply({"params": p}, x, context=context, context_mask=m))
    p = jax.tree.map(np.asarray, params)
    q = np.einsum("bsd,dhk->bshk", x, p["q_kernel"]) + p["q_bias"]
    keys = [np.einsum("bsd,dhk->bshk", x, p["k_kernel"]) + p["k_bias"]]
    keys.append(np.einsum("bcd,dhk->bchk", context, p["context_k_kernel"]) + p["context_k_bias"])
    values = [np.einsum("bsd,dhk->bshk", x, p["v_kernel"]) + p["v_bias"]]
    values.append(np.einsum("bcd,dhk->bchk", context, p["context_v_kernel"]) + p["context_v_bias"])
    key, value = np.concatenate(keys, 1), np.concatenate(values, 1)

    def reference(context_mask):  # fully masked: the plain self-attention
        logits = np.einsum("bqhk,bthk->bhqt", q, key) / np.sqrt(8)
        visible = np.concatenate([np.ones((2, 6), bool), np.asarray(context_mask)], 1)
        logits = np.where(visible[:, None, None], logits, -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return np.einsum("bhqt,bthk,hkd->bqd", probs, value, p["out_kernel"]) + p["out_bias"]

    for visible in (context_mask, jnp.zeros((2, 3), bool)):
        np.testing.assert_allclose(apply(params, visible), reference(visible), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="KV cache"):
        layers.Attention(num_heads=2, out_std=0.2, cache_length=6).init(jax.random.key(0), x, context=context)


# Ours, counted on abstract shapes (pinned so that a change of the architecture shows), beside
# Table 3's "Model size" (unCLIP appendix C). The decoder's paper count includes GLIDE's 1.2B text
# transformer, which ours replaces by CLIP's text tower (not counted here): its U-Net is compared
# with GLIDE's "roughly 2.3 billion parameters for the visual part" (Nichol et al. 2021, s4.1).
OURS = {
    "decoder_paper": 2_250_745_859,
    "upsampler_64_256_paper": 729_702_083,
    "upsampler_256_1024_paper": 282_059_139,
}


@pytest.mark.parametrize("name", sorted(OURS))
def test_paper_preset_sizes(name):
    count = unet.param_count(unet_spec.PRESETS[name])
    assert count == OURS[name]
    paper = unet_spec.GLIDE_VISUAL_PARAMS if name == "decoder_paper" else unet_spec.PAPER_PARAMS[name]
    assert abs(count / paper - 1) < 0.07, (name, count, paper)


def matmul_flops(jaxpr) -> float:
    """2 x the multiply-adds of every dot_general and conv in a jaxpr (nested ones included),
    counting a conv's padded taps as its hardware does."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
        elif eqn.primitive.name == "conv_general_dilated":
            kh, kw, cin, _ = eqn.invars[1].aval.shape  # HWIO
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * kh * kw * cin
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # older jax wraps a jaxpr in a ClosedJaxpr
                if hasattr(sub, "eqns"):
                    total += matmul_flops(sub)
    return total


def test_flops_count_every_matmul_and_conv():
    """The hand count equals the FLOPs of the dots and convs the traced forward runs (attention
    with CLIP tokens and caption, resampling, skips); training counts 3 forwards."""
    x, t, clip, states, mask = decoder_inputs()
    params = nn.meta.unbox(unet.abstract_params(unet.UNet(DECODER)))
    jaxpr = jax.make_jaxpr(lambda p, *a: unet.UNet(DECODER).apply({"params": p}, *a))(
        params, x, t, clip, states, mask
    )
    assert unet_spec.forward_flops(DECODER, SIZE, TEXT) * BATCH == matmul_flops(
        getattr(jaxpr, "jaxpr", jaxpr)
    )
    train = unet_spec.train_flops_per_example(DECODER, SIZE, TEXT)
    assert train == 3 * unet_spec.forward_flops(DECODER, SIZE, TEXT)


def test_spec_and_input_errors():
    for bad, field in (
        (dict(norm_groups=5), "norm_groups"),
        (dict(attention_resolutions=(4,)), "attention_resolutions"),
        (dict(head_channels=12), "head_channels"),
        (dict(dtype="float16"), "dtype"),
    ):
        with pytest.raises(ConfigError, match=field):
            unet_spec.check_spec(dataclasses.replace(DECODER, **bad))
    with pytest.raises(ConfigError, match="attention_resolutions"):
        unet_spec.check_spec(dataclasses.replace(UPSAMPLER, text_width=4))
    params = random_params(DECODER)
    x, t, clip, states, mask = decoder_inputs()
    with pytest.raises(ValueError, match="clip_embedding"):
        unet.UNet(DECODER).apply({"params": params}, x, t, None, states, mask)
    with pytest.raises(ValueError, match="multiples of 2"):
        unet.UNet(DECODER).apply({"params": params}, x[:, :15], t, clip, states, mask)


def test_clip_text_token_states():
    """encode_text_tokens: the pooled features equal encode_text's, the states are read at the
    end-of-text token before the projection, and text_token_mask covers the caption and its end."""
    config = defaults.clip_config(
        defaults.model_config(
            image_size=16,
            patch_size=8,
            vision_width=32,
            vision_layers=1,
            vision_heads=2,
            text_width=32,
            text_layers=2,
            text_heads=2,
            embed_dim=12,
            activation="gelu",
        ),
        defaults.text_config(merges_file="", vocab_size=300, context_length=8),
    )
    model = clip_model.clip_from_config(config)
    abstract = nn.meta.unbox(clip_model.abstract_params(model))
    rng = np.random.default_rng(6)
    params = jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), jnp.float32), abstract)
    tokens = rng.integers(1, 299, size=(3, 8)).astype(np.int32)
    for row, end in enumerate((2, 5, 7)):
        tokens[row, end], tokens[row, end + 1 :] = 299, 0

    @jax.jit  # one compile for the three, not op by op
    def encode(params, tokens):
        return (
            clip_model.encode_text_tokens(model, params, tokens),
            clip_model.encode_text(model, params, tokens),
            clip_model.encode_text(model, params, tokens, normalize=False),
        )

    (states, pooled), normalised, raw = encode(params, tokens)
    assert states.shape == (3, 8, 32) and states.dtype == jnp.float32
    np.testing.assert_array_equal(pooled, normalised)
    at_end = states[np.arange(3), [2, 5, 7]]
    np.testing.assert_allclose(at_end @ params["text"]["text_projection"], raw, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        clip_model.text_token_mask(tokens), np.arange(8)[None] <= np.array([2, 5, 7])[:, None]
    )
