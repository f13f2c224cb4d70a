"""CLIP model: tower shapes, EOT pooling, causal mask, activations, temperature clamp, layouts,
sharded forward, a short training run that lowers the loss, and the inference API on a workdir."""

import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clip_jax import clip_models, defaults
from clip_jax.model import (
    Attention,
    MAX_LOGIT_SCALE,
    abstract_params,
    clip_from_config,
    encode_image,
    encode_text,
    exact_gelu,
    init_params,
    logit_scale,
    quick_gelu,
)
from core_jax import sharding
from tests.testfiles import load_config

IMAGE, CONTEXT, VOCAB, EMBED = 16, 8, 300, 12


def tiny_config(**model):
    sizes = dict(
        image_size=IMAGE,
        patch_size=8,
        vision_width=32,
        vision_layers=2,
        vision_heads=2,
        text_width=32,
        text_layers=2,
        text_heads=2,
        embed_dim=EMBED,
        activation="gelu",
    )
    sizes.update(model)
    c = defaults.clip_config(
        defaults.model_config(**sizes),
        defaults.text_config(merges_file="", vocab_size=VOCAB, context_length=CONTEXT),
    )
    return c


def make_params(config, seed=0):
    """Random params in the tree of the model `config` builds (the paper's, or an experiment's),
    drawn with numpy.

    (Compiling the Flax init with the default threefry RNG costs ~20 s on 2 CPU cores; the layout
    comes from eval_shape, which compiles nothing. Real init is covered once, in test_init.)
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "scale":
            return 1.0 + 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "logit_scale":
            return np.float32(math.log(1 / 0.07))
        if name == "logit_bias":
            return np.float32(-10.0)
        fan_in = leaf.shape[-3] if name.endswith("_kernel") and name[0] in "qkv" else leaf.shape[0]
        std = 0.1 if leaf.ndim == 1 or "bias" in name else fan_in**-0.5
        return (std * rng.standard_normal(leaf.shape)).astype(np.float32)

    abstract = nn.meta.unbox(abstract_params(clip_models.clip_from_config(config)))
    return jax.tree_util.tree_map_with_path(draw, abstract)


# One compile per (model, function) for the whole module; eager Flax would compile op by op.
encode_image = jax.jit(encode_image, static_argnums=(0, 3))
encode_text = jax.jit(encode_text, static_argnums=(0, 3))


def tokens_with_eot(rng, batch, eot_positions):
    """Random ids below the end id (VOCAB - 1), with the end id at the given positions."""
    t = rng.integers(1, VOCAB - 1, size=(batch, CONTEXT)).astype(np.int32)
    for row, pos in enumerate(eot_positions):
        t[row, pos] = VOCAB - 1
        t[row, pos + 1 :] = 0
    return t


def test_tower_shapes_and_normalisation():
    config = tiny_config()
    model, params = clip_from_config(config), make_params(config)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, IMAGE, IMAGE, 3)).astype(np.float32)
    tokens = tokens_with_eot(rng, 3, [2, 5, 7])
    img, txt = encode_image(model, params, images), encode_text(model, params, tokens)
    assert img.shape == (3, EMBED) and txt.shape == (3, EMBED)
    np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1.0, atol=1e-5)
    raw = encode_image(model, params, images, normalize=False)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=-1, keepdims=True), img, atol=1e-5)
    with pytest.raises(ValueError, match="expected images"):
        encode_image(model, params, images[:, :8])
    with pytest.raises(ValueError, match="L<=8"):
        encode_text(model, params, np.zeros((1, CONTEXT + 1), np.int32))


def test_sincos2d_positions_replace_the_learned_table():
    config = tiny_config(posemb="sincos2d")
    model, params = clip_from_config(config), make_params(config)
    names = ["/".join(map(str, path)) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert sum("positional_embedding" in n for n in names) == 1  # the text tower's only
    assert len(names) == len(jax.tree_util.tree_leaves(make_params(tiny_config()))) - 1
    # Two patches' contents exchanged: the same bag of patches in other places, another embedding.
    images = np.random.default_rng(0).normal(size=(1, IMAGE, IMAGE, 3)).astype(np.float32)
    swapped = images.copy()
    swapped[:, :8, :8], swapped[:, 8:, 8:] = images[:, 8:, 8:], images[:, :8, :8]
    a, b = encode_image(model, params, images), encode_image(model, params, swapped)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    with pytest.raises(ValueError, match="posemb must be one of"):
        clip_from_config(tiny_config(posemb="rope"))
    with pytest.raises(ValueError, match="divisible by 4"):
        clip_from_config(tiny_config(posemb="sincos2d", vision_width=30, vision_heads=3))


def test_text_features_come_from_the_end_token():
    config = tiny_config()
    model, params = clip_from_config(config), make_params(config)
    rng = np.random.default_rng(1)
    tokens = tokens_with_eot(rng, 2, [3, 3])
    after = tokens.copy()
    after[:, 4:] = rng.integers(1, VOCAB - 1, size=(2, CONTEXT - 4))  # ids after the end token
    np.testing.assert_allclose(
        encode_text(model, params, tokens), encode_text(model, params, after), atol=1e-6
    )
    before = tokens.copy()
    before[:, 1] = np.where(before[:, 1] == 1, 2, 1)  # a token before the end token
    assert not np.allclose(encode_text(model, params, tokens), encode_text(model, params, before), atol=1e-4)
    # The feature is the end token's: moving it moves the feature.
    moved = tokens.copy()
    moved[:, 3], moved[:, 4] = 5, VOCAB - 1
    assert not np.allclose(encode_text(model, params, tokens), encode_text(model, params, moved), atol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_causal_mask(causal):
    attn = Attention(num_heads=2, causal=causal, out_std=0.2)
    x = np.random.default_rng(2).normal(size=(2, 6, 16)).astype(np.float32)
    variables = attn.init(jax.random.key(0), x)
    y = attn.apply(variables, x)
    x2 = x.copy()
    x2[:, 4:] += 1.0  # change the last two positions
    y2 = attn.apply(variables, x2)
    early_same = np.allclose(y[:, :4], y2[:, :4], atol=1e-6)
    assert early_same == causal  # without the mask the change leaks backwards
    assert not np.allclose(y[:, 4:], y2[:, 4:], atol=1e-4)


def test_activations():
    x = np.linspace(-4, 4, 101).astype(np.float32)
    np.testing.assert_allclose(quick_gelu(x), x / (1 + np.exp(-1.702 * x)), rtol=1e-5, atol=1e-6)
    erf = np.vectorize(math.erf)
    np.testing.assert_allclose(exact_gelu(x), 0.5 * x * (1 + erf(x / np.sqrt(2))), atol=1e-6)
    assert np.abs(np.asarray(exact_gelu(x)) - np.asarray(nn.gelu(x))).max() > 1e-4  # not tanh
    assert np.abs(np.asarray(exact_gelu(x)) - np.asarray(quick_gelu(x))).max() > 1e-3
    quick, exact = tiny_config(activation="quick_gelu"), tiny_config(activation="gelu")
    params = make_params(exact)
    images = np.random.default_rng(3).normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
    assert not np.allclose(
        encode_image(clip_from_config(quick), params, images),
        encode_image(clip_from_config(exact), params, images),
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="activation"):
        clip_from_config(tiny_config(activation="relu"))


def test_init_and_logit_scale_clamp():
    """Real init (a fast RNG: threefry init compiles for ~20 s here): temperature, bias, tree."""
    model = clip_from_config(tiny_config(loss="sigmoid"))
    boxed = jax.jit(init_params, static_argnums=0)(model, jax.random.key(0, impl="unsafe_rbg"))
    params = nn.meta.unbox(boxed)
    assert float(params["logit_scale"]) == pytest.approx(math.log(10), rel=1e-6)
    assert float(params["logit_bias"]) == -10.0
    shapes = jax.tree.map(lambda x: x.shape, params)
    assert shapes == jax.tree.map(lambda x: x.shape, nn.meta.unbox(abstract_params(model)))
    softmax = clip_from_config(tiny_config())
    params = make_params(tiny_config())
    assert float(
        logit_scale(softmax, dict(params, logit_scale=jnp.float32(math.log(1 / 0.07))))
    ) == pytest.approx(1 / 0.07, rel=1e-5)
    assert logit_scale(softmax, dict(params, logit_scale=jnp.float32(10.0))) == pytest.approx(100.0, rel=1e-5)
    assert MAX_LOGIT_SCALE == pytest.approx(math.log(100))
    assert defaults.model_config().logit_scale_init == pytest.approx(2.6593, abs=1e-4)


def _stack_layers(tree):
    """Unrolled params (transformer/layer_i) -> the scanned layout (transformer/scan/block)."""
    if not isinstance(tree, dict):
        return tree
    if "layer_0" in tree:
        layers = [tree[f"layer_{i}"] for i in range(len(tree))]
        return {"scan": {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}}
    return {k: _stack_layers(v) for k, v in tree.items()}


def test_scan_unrolled_remat_and_bf16_agree():
    unrolled = tiny_config()
    unrolled.scan_layers = False
    scanned = tiny_config()
    params_u = make_params(unrolled)
    params_s = _stack_layers(params_u)
    rng = np.random.default_rng(4)
    images = rng.normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
    tokens = tokens_with_eot(rng, 2, [4, 6])
    ref = encode_image(clip_from_config(unrolled), params_u, images)
    np.testing.assert_allclose(encode_image(clip_from_config(scanned), params_s, images), ref, atol=1e-5)
    remat = tiny_config()
    remat.remat = "full"
    grads = [
        jax.grad(lambda p, m=m: jnp.sum(encode_text(m, p, tokens) ** 3))(params_s)
        for m in (clip_from_config(scanned), clip_from_config(remat))
    ]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), *grads)
    bf16 = tiny_config()
    bf16.compute_dtype = "bfloat16"
    low = encode_image(clip_from_config(bf16), params_s, images)
    assert low.dtype == jnp.float32 and np.abs(low - ref).max() < 0.05


def test_every_param_has_known_logical_names():
    boxed = abstract_params(clip_from_config(tiny_config()))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    known = {name for name, _ in sharding.LOGICAL_AXIS_RULES}
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), leaf
        assert len(leaf.names) == leaf.value.ndim
        assert all(n is None or n in known for n in leaf.names), leaf.names
    flat = flax.traverse_util.flatten_dict(nn.meta.unbox(boxed))
    q = flat[("visual", "transformer", "scan", "block", "attn", "q_kernel")]
    assert q.shape == (2, 32, 2, 16)  # [layers, embed, heads, kv]


def test_sharded_forward_and_loss_equal_unsharded():
    from clip_jax.task import make_loss_fn

    config = tiny_config(vision_heads=2, text_heads=2)
    model = clip_from_config(config)
    boxed = abstract_params(model)
    params = make_params(config)
    rng = np.random.default_rng(5)
    batch = {
        "image": rng.normal(size=(8, IMAGE, IMAGE, 3)).astype(np.float32),
        "text": tokens_with_eot(rng, 8, rng.integers(1, CONTEXT, 8)),
    }
    loss_fn = jax.jit(make_loss_fn(model, "softmax"))
    ref_loss, ref_metrics = loss_fn(params, batch, None, 0)
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    shardings = sharding.tree_shardings(mesh, boxed)
    sharded_params = jax.device_put(params, nn.meta.unbox(shardings))
    sharded_batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    specs = flax.traverse_util.flatten_dict(nn.meta.unbox(shardings))
    block = ("visual", "transformer", "scan", "block")
    assert specs[block + ("attn", "q_kernel")].spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert specs[block + ("mlp", "fc_kernel")].spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert specs[("text", "token_embedding")].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    with jax.set_mesh(mesh):
        loss, metrics = loss_fn(sharded_params, sharded_batch, None, 0)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for k in ref_metrics:
        np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5)


def test_training_steps_reduce_the_loss():
    """A plain optax loop on 16 fixed pairs: the contrastive loss must fall well below chance."""
    from clip_jax.task import make_loss_fn

    config = tiny_config()
    model = clip_from_config(config)
    params = make_params(config)
    rng = np.random.default_rng(6)
    batch = {
        "image": rng.normal(size=(16, IMAGE, IMAGE, 3)).astype(np.float32),
        "text": tokens_with_eot(rng, 16, rng.integers(2, CONTEXT, 16)),
    }
    loss_fn = make_loss_fn(model, "softmax")
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, None, 0)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, metrics

    opt_state = tx.init(params)
    params, opt_state, first, _ = step(params, opt_state)
    for _ in range(40):
        params, opt_state, loss, metrics = step(params, opt_state)
    assert float(first) > 0.8 * math.log(16)
    assert float(loss) < 0.3 * float(first), (first, loss)
    assert float(metrics["i2t_accuracy"]) > 0.9 and float(metrics["t2i_accuracy"]) > 0.9


def test_api_loads_a_saved_workdir(tmp_path):
    from clip_jax.api import CLIPModel
    from core_jax.checkpoint import save_params
    from core_jax.text import BPETokenizer, train_bpe

    config = tiny_config()
    merges = train_bpe(
        ["a red circle", "a blue square", "a green triangle"] * 3, VOCAB, str(tmp_path / "merges.txt")
    )
    config.text.merges_file = merges
    params = make_params(config, seed=1)
    save_params(str(tmp_path / "w"), config, params)
    clip = CLIPModel.load(str(tmp_path / "w"))
    assert clip.image_size == IMAGE and isinstance(clip.tokenizer, BPETokenizer)
    images = np.random.default_rng(7).integers(0, 256, size=(5, IMAGE, IMAGE, 3), dtype=np.uint8)
    model = clip_from_config(config)
    expected = encode_image(model, params, clip.preprocess_images(images))
    np.testing.assert_allclose(clip.embed_images(images, batch_size=2), expected, atol=1e-5)
    texts = ["a red circle", "a blue square", "a green triangle"]
    expected = encode_text(model, params, clip.tokenizer.encode(texts))
    np.testing.assert_allclose(clip.embed_texts(texts, batch_size=2), expected, atol=1e-5)
    assert clip.logit_scale() == pytest.approx(1 / 0.07, rel=1e-5)
    big = np.random.default_rng(8).integers(0, 256, size=(2, 40, 30, 3), dtype=np.uint8)
    assert clip.preprocess_images(big).shape == (2, IMAGE, IMAGE, 3)
    np.testing.assert_allclose(
        clip.preprocess_images(images[:1])[0],
        (images[0] / 255.0 - np.array([0.48145466, 0.4578275, 0.40821073]))
        / np.array([0.26862954, 0.26130258, 0.27577711]),
        atol=1e-5,
    )


def test_make_task_preprocessing_and_hooks(tmp_path):
    from clip_jax.task import make_example_fns, make_task, make_tokenizer
    from core_jax.config import ConfigError
    from core_jax.data.shapes import make_example

    config = load_config("clip_shapes")
    task = make_task(config, str(tmp_path))  # trains the BPE into the workdir
    assert (tmp_path / "tokenizer" / "merges.txt").exists()
    assert [e.name for e in task.evaluators] == ["zeroshot"]
    raw = make_example("train", 3)
    rng = np.random.default_rng(0)
    ex = task.example_fn(raw, rng)
    assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.float32
    assert ex["text"].shape == (config.text.context_length,) and ex["text"].dtype == np.int32
    assert ex["text"].max() < config.text.vocab_size and ex["text"][0] == ex["text"].max() - 1
    assert task.flops_per_example > 0
    _, eval_example_fn = make_example_fns(config, make_tokenizer(config, str(tmp_path)))
    np.testing.assert_array_equal(eval_example_fn(raw, rng)["text"], ex["text"])
    abstract = make_task(config, None)  # core_jax.aot: shapes only, no tokenizer or data
    assert abstract.example_fn is None and not abstract.evaluators
    spec = abstract.batch_spec(8)
    assert spec["image"].shape == (8, 64, 64, 3) and spec["text"].shape == (8, config.text.context_length)
    assert spec["text"].dtype == np.int32
    with config.unlocked():
        config.data.image_size = 32
    with pytest.raises(ConfigError, match="image_size"):
        make_task(config, str(tmp_path))
    vocab_size = config.text.vocab_size
    with config.unlocked():
        config.data.image_size = 64
        config.text.vocab_size = 100
    with pytest.raises(ConfigError, match="vocab_size"):
        make_task(config, str(tmp_path))
    # The workdir's tokenizer was trained for the config's own vocab_size: other values are refused.
    with config.unlocked():
        config.text.vocab_size = 400
    with pytest.raises(ConfigError, match="trained with vocab_size=386 on 'shapes'"):
        make_task(config, str(tmp_path))
    with config.unlocked():
        config.text.vocab_size = vocab_size
        config.eval.evaluators = "zeroshot,nonsense"
    with pytest.raises(ConfigError, match="nonsense"):
        make_task(config, str(tmp_path))
