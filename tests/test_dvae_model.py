"""dVAE model, objective and sharding on tiny configs (8 fake CPU devices from conftest)."""

import math
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from core_jax import sharding  # noqa: E402
from core_jax.data import image_ops  # noqa: E402
from dalle_jax import dvae as dvae_lib  # noqa: E402
from dalle_jax import dvae_loss, dvae_models, dvae_task  # noqa: E402
from tests.testfiles import load_config  # noqa: E402


def tiny_model_config(**overrides):
    m = dvae_lib.default_model_config()
    m.update(
        dict(
            vocab_size=64,
            hidden=8,
            width_multipliers=(1, 2, 2, 4),
            blocks_per_group=1,
            decoder_init_channels=16,
            temperature_anneal_steps=10,
            kl_weight_ramp_steps=10,
            kl_weight_end=1.0,
        )
    )
    m.update(overrides)
    return m


def mapped_images(n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return image_ops.dvae_map_pixels(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def init(model, x, seed=0):
    return nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), x)["params"])


def test_shapes_64_to_8_tokens_and_types():
    m = tiny_model_config()
    model = dvae_lib.make_dvae(m)
    x = jnp.asarray(mapped_images(2))
    params = init(model, x)

    @jax.jit
    def run(params, x):
        codes, rec, logits = dvae_task.reconstruct_fn(model)(params, x)
        decode = lambda c: model.apply({"params": params}, c, method=dvae_lib.DVAE.decode)
        return codes, rec, logits, decode(codes), decode(jax.nn.one_hot(codes, m.vocab_size))

    codes, rec, logits, stats, stats_onehot = run(params, x)
    assert logits.shape == (2, 8, 8, 64) and logits.dtype == jnp.float32
    assert dvae_lib.grid_size(m, 64) == 8
    assert codes.shape == (2, 8, 8) and codes.dtype == jnp.int32
    assert rec.shape == (2, 64, 64, 3) and float(rec.min()) >= 0.0 and float(rec.max()) <= 1.0
    assert stats.shape == (2, 64, 64, 6)
    # The embedding lookup for int tokens equals the 1x1 conv on their one-hot codes.
    np.testing.assert_allclose(stats, stats_onehot, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="not divisible"):
        dvae_lib.grid_size(m, 60)


def test_openai_default_param_counts():
    m = dvae_lib.default_model_config()
    model = dvae_lib.make_dvae(m)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 256, 256, 3))))
    params = nn.meta.unbox(shapes["params"])
    count = lambda t: sum(math.prod(x.shape) for x in jax.tree.leaves(t))
    # OpenAI's released encoder and decoder: ~53.8M and ~43.8M parameters.
    assert abs(count(params["encoder"]) - 53.8e6) < 0.1e6
    assert abs(count(params["decoder"]) - 43.8e6) < 0.1e6
    assert params["decoder"]["input"]["kernel"].shape == (1, 1, 8192, 128)
    assert params["encoder"]["output"]["kernel"].shape == (1, 1, 2048, 8192)
    logits = jax.eval_shape(
        lambda p, x: model.apply({"params": p}, x, method=dvae_lib.DVAE.encode),
        params,
        jnp.zeros((1, 256, 256, 3)),
    )
    assert logits.shape == (1, 32, 32, 8192)


def test_residual_block_scaling():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 8)), jnp.float32)
    for n_in, n_layers in ((8, 8), (4, 3)):
        xin = x[..., :n_in]
        block = dvae_lib.ResBlock(features=8, kernels=(3, 3, 3, 1), n_layers=n_layers)
        params = init(block, xin)
        out = block.apply({"params": params}, xin)
        # Recompute the residual path by hand from the same params.
        h = xin
        for i in range(4):
            p = params[f"conv_{i + 1}"]
            h = (
                jax.lax.conv_general_dilated(
                    jax.nn.relu(h), p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
                )
                + p["bias"]
            )
        if n_in == 8:
            assert "id_path" not in params
            identity = xin
        else:
            identity = (
                jnp.einsum("bhwc,cd->bhwd", xin, params["id_path"]["kernel"][0, 0])
                + params["id_path"]["bias"]
            )
        np.testing.assert_allclose(out, identity + h / n_layers**2, atol=1e-5, rtol=1e-5)
        assert params["conv_1"]["kernel"].shape == (3, 3, n_in, 2)  # hidden width = out / 4


@pytest.mark.parametrize("n_in,kernels", [(16, (1, 3, 3, 3)), (8, (1, 3, 3, 3)), (16, (3, 3, 3, 1))])
def test_block_with_upsampled_input_equals_upsampling_first(n_in, kernels):
    """The decoder runs a group's input 1x1 convs before the x2 upsampling: same params, same values
    (and gradients) as upsampling first, whether the width changes (id_path) or not; a leading 3x3
    conv falls back to upsampling first."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 4, n_in)), jnp.float32)
    fast = dvae_lib.ResBlock(features=8, kernels=kernels, n_layers=4, upsample_input=True)
    plain = dvae_lib.ResBlock(features=8, kernels=kernels, n_layers=4)
    up = dvae_lib.upsample_2x(x)
    assert up.shape == (2, 8, 8, n_in)
    params = init(plain, up)
    assert jax.tree.map(jnp.shape, init(fast, x)) == jax.tree.map(jnp.shape, params)
    # Random biases, so a wrong order of bias and upsampling would show.
    params = jax.tree.map(
        lambda p: p + 0.1 * jnp.arange(p.size, dtype=p.dtype).reshape(p.shape) / p.size, params
    )
    out = fast.apply({"params": params}, x)
    np.testing.assert_allclose(out, plain.apply({"params": params}, up), atol=1e-6, rtol=1e-6)
    g_fast = jax.grad(lambda p: jnp.sum(fast.apply({"params": p}, x) ** 2))(params)
    g_plain = jax.grad(lambda p: jnp.sum(plain.apply({"params": p}, up) ** 2))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5), g_fast, g_plain)


def test_decoder_flops_count_the_upsampled_1x1_convs_at_low_resolution():
    m = tiny_model_config()
    _, dec = dvae_lib.forward_flops(m, 32, soft_codes=False)

    # By hand: groups at 4, 8, 16, 32 px with widths 32, 16, 16, 8 (decoder order), input 16 channels.
    def conv(s, k, i, o):
        return 2 * s * s * k * k * i * o

    expected = 0
    c, s = 16, 4
    for g, w in enumerate((32, 16, 16, 8)):
        low = 4 if g > 0 else 1
        hid = w // 4
        if c != w:
            expected += conv(s, 1, c, w) // low
        expected += conv(s, 1, c, hid) // low + 2 * conv(s, 3, hid, hid) + conv(s, 3, hid, w)
        c = w
        if g < 3:
            s *= 2
    expected += conv(32, 1, 8, 6)
    assert dec == expected


def test_schedules_start_and_end():
    m = tiny_model_config(
        temperature_start=1.0,
        temperature_end=1 / 16,
        temperature_anneal_steps=100,
        kl_weight_start=0.0,
        kl_weight_end=6.6,
        kl_weight_ramp_steps=50,
    )
    for kind in ("cosine", "exponential", "linear"):
        m.temperature_schedule = kind
        assert float(dvae_loss.temperature(m, 0)) == pytest.approx(1.0)
        assert float(dvae_loss.temperature(m, 100)) == pytest.approx(1 / 16)
        assert float(dvae_loss.temperature(m, 10_000)) == pytest.approx(1 / 16)
    m.temperature_schedule = "exponential"
    assert float(dvae_loss.temperature(m, 50)) == pytest.approx(0.25)  # geometric midpoint
    m.temperature_schedule = "cosine"
    assert float(dvae_loss.temperature(m, 50)) == pytest.approx((1 + 1 / 16) / 2)
    assert float(dvae_loss.kl_weight(m, 0)) == pytest.approx(0.0)
    assert float(dvae_loss.kl_weight(m, 50)) == pytest.approx(6.6)
    assert float(dvae_loss.kl_weight(m, 25)) == pytest.approx(3.3)
    m.kl_weight_schedule = "exponential"
    with pytest.raises(ValueError, match="exponential"):
        dvae_loss.kl_weight(m, 0)
    m.kl_weight_schedule = "sigmoid"
    with pytest.raises(ValueError, match="unknown schedule"):
        dvae_loss.kl_weight(m, 0)
    # usage_weight: constant by default (usage_weight_end ignored), else start -> end like the others
    m.usage_weight, m.usage_weight_end, m.usage_weight_steps = 3.0, 0.5, 100
    assert float(dvae_loss.usage_weight(m, 0)) == float(dvae_loss.usage_weight(m, 100)) == 3.0
    m.usage_weight_schedule = "linear"
    assert [float(dvae_loss.usage_weight(m, s)) for s in (0, 50, 100, 500)] == pytest.approx(
        [3, 1.75, 0.5, 0.5]
    )


def test_gumbel_softmax_relaxation():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(4, 3, 3, 16)), jnp.float32)
    soft = dvae_loss.gumbel_softmax(jax.random.key(0), logits, 1.0)
    np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-5)
    assert float(soft.max()) < 1.0
    cold = dvae_loss.gumbel_softmax(jax.random.key(0), logits, 1e-3)
    np.testing.assert_allclose(cold.max(-1), 1.0, atol=1e-3)  # low temperature -> one-hot
    hard = dvae_loss.gumbel_softmax(jax.random.key(0), logits, 1.0, straight_through=True)
    assert set(np.unique(np.asarray(hard)).round(5)) <= {0.0, 1.0}
    np.testing.assert_array_equal(hard.argmax(-1), soft.argmax(-1))
    g = jax.grad(
        lambda l: jnp.sum(dvae_loss.gumbel_softmax(jax.random.key(0), l, 1.0, True) * jnp.arange(16.0))
    )(logits)
    assert float(jnp.abs(g).sum()) > 0  # straight-through passes the relaxed gradient


def test_straight_through_from_a_step_switches_inside_jit():
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(2, 2, 2, 8)), jnp.float32)
    m = tiny_model_config(straight_through_from_step=5)
    codes = jax.jit(
        lambda step: dvae_loss.gumbel_softmax(
            jax.random.key(0), logits, 1.0, dvae_loss.straight_through_now(m, step)
        )
    )
    before, after = np.asarray(codes(4)), np.asarray(codes(5))
    assert before.max() < 1.0  # relaxed
    np.testing.assert_allclose(after, np.eye(8)[before.argmax(-1)], atol=1e-6)  # hard, same codes
    assert dvae_loss.straight_through_now(tiny_model_config(), 10**6) is False
    assert dvae_loss.straight_through_now(tiny_model_config(straight_through=True), 0) is True


def test_logit_laplace_against_hand_computation():
    x = np.array([0.2, 0.5, 0.85], np.float32).reshape(1, 1, 1, 3)
    mu = np.array([0.0, 1.0, -0.5], np.float32)
    log_b = np.array([0.0, -1.0, 0.5], np.float32)
    stats = np.concatenate([mu, log_b]).reshape(1, 1, 1, 6)
    got = np.asarray(dvae_loss.logit_laplace_nll(x, stats)).reshape(-1)
    for i in range(3):
        xi, b = float(x.reshape(-1)[i]), math.exp(log_b[i])
        density = 1.0 / (2 * b * xi * (1 - xi)) * math.exp(-abs(math.log(xi / (1 - xi)) - mu[i]) / b)
        assert got[i] == pytest.approx(-math.log(density), rel=1e-5)
    # Numeric check of the first element: log 2 + 0 + log .2 + log .8 + |log(.25)| = 0.7436...
    assert got[0] == pytest.approx(math.log(2) + math.log(0.2) + math.log(0.8) + math.log(4), rel=1e-6)


def test_kl_to_uniform_and_codebook_metrics():
    vocab = 8
    uniform = jnp.zeros((2, 2, 2, vocab))
    np.testing.assert_allclose(dvae_loss.kl_to_uniform(uniform), 0.0, atol=1e-6)
    peaked = jnp.full((1, 1, 1, vocab), -1e9).at[..., 3].set(0.0)
    assert float(dvae_loss.kl_to_uniform(peaked)[0, 0, 0]) == pytest.approx(math.log(vocab), rel=1e-5)
    # 4 positions each certain of a different code: perplexity 4, half the codes used.
    logits = jnp.full((1, 2, 2, vocab), -1e9)
    for i, code in enumerate((0, 1, 2, 3)):
        logits = logits.at[0, i // 2, i % 2, code].set(0.0)
    metrics = dvae_loss.codebook_metrics(logits)
    assert float(metrics["codebook_perplexity"]) == pytest.approx(4.0, rel=1e-4)
    assert float(metrics["codebook_used_fraction"]) == pytest.approx(0.5)
    mask = jnp.array([False])
    assert float(dvae_loss.code_histogram(logits, mask).sum()) == 0.0


def test_pixel_mapping_matches_reference_formulas():
    x = np.linspace(0, 1, 11, dtype=np.float32)
    np.testing.assert_allclose(image_ops.map_pixels(x), 0.8 * x + 0.1, atol=1e-7)
    np.testing.assert_allclose(image_ops.unmap_pixels(image_ops.map_pixels(x)), x, atol=1e-6)
    stats = jnp.zeros((1, 1, 1, 6))  # sigmoid(0) = 0.5 mapped -> 0.5 unmapped
    np.testing.assert_allclose(dvae_loss.reconstruct_pixels(stats), 0.5, atol=1e-6)


def shapes_images(n):
    from core_jax.data.shapes import make_example

    # 32x32 (every other pixel) keeps the compile and steps cheap; objects stay large and sharp.
    return np.stack(
        [image_ops.dvae_map_pixels(make_example("train", i)["image"][::2, ::2]) for i in range(n)]
    )


def _train_losses(m, steps, lr=3e-3):
    config = ml_collections.ConfigDict(dict(model=m, compute_dtype="float32", remat="none"))
    model = dvae_task.model_from_config(config)
    loss_fn = dvae_task.make_loss_fn(model, m)
    x = jnp.asarray(shapes_images(4))
    params = init(model, x)
    tx = optax.adam(lr)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, i):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, {"image": x}, jax.random.key(i), i
        )
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss, metrics

    losses = []
    for i in range(steps):
        params, opt, loss, metrics = step(params, opt, i)
        losses.append(float(loss))
    return losses, metrics


@pytest.mark.parametrize("recon_loss,straight_through", [("logit_laplace", False), ("mse", True)])
def test_loss_decreases(recon_loss, straight_through):
    m = tiny_model_config(
        width_multipliers=(1, 2), recon_loss=recon_loss, straight_through=straight_through, kl_weight_end=0.0
    )
    losses, metrics = _train_losses(m, 12)
    assert all(np.isfinite(losses))
    print(losses)
    # Per-dimension losses: logit-Laplace falls by nats, MSE by a fraction of its start.
    drop = 0.2 if recon_loss == "logit_laplace" else 0.1 * losses[0]
    assert np.mean(losses[-3:]) < losses[0] - drop, losses
    for key in (
        "psnr",
        "mse",
        "kl",
        "codebook_perplexity",
        "codebook_used_fraction",
        "temperature",
        "kl_weight",
        "recon_loss",
    ):
        assert np.isfinite(float(metrics[key])), key


def test_init_and_apply_on_mesh_shards_params():
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
    m = tiny_model_config()
    config = ml_collections.ConfigDict(dict(model=m, compute_dtype="float32", remat="none"))
    model = dvae_task.model_from_config(config)
    loss_fn = dvae_task.make_loss_fn(model, m)
    x = mapped_images(8)
    batch_sharding = sharding.batch_sharding(mesh, 4)
    abstract = jax.eval_shape(lambda r, x: model.init(r, x)["params"], jax.random.key(0), x)
    shardings = sharding.tree_shardings(mesh, abstract)
    assert shardings["decoder"]["input"]["kernel"].spec == P(None, None, "tensor")  # vocab rows
    assert shardings["encoder"]["group_2"]["block_1"]["conv_1"]["kernel"].spec == P(
        None, None, "fsdp", "tensor"
    )
    assert shardings["encoder"]["output"]["kernel"].spec == P(None, None, "fsdp", "tensor")
    unboxed_shardings = nn.meta.unbox(shardings)
    with jax.set_mesh(mesh):
        params = jax.jit(
            lambda r, x: nn.meta.unbox(model.init(r, x)["params"]), out_shardings=unboxed_shardings
        )(jax.random.key(0), x)
        kernel = params["encoder"]["group_2"]["block_1"]["conv_1"]["kernel"]
        assert kernel.sharding.spec == P(None, None, "fsdp", "tensor")
        xs = jax.device_put(x, batch_sharding)
        loss, metrics = jax.jit(loss_fn)(params, {"image": xs}, jax.random.key(1), jnp.int32(0))
        assert np.isfinite(float(loss))
    # Same numbers as on one device.
    single = jax.device_get(params)
    loss1, _ = jax.jit(loss_fn)(single, {"image": x}, jax.random.key(1), jnp.int32(0))
    assert float(loss) == pytest.approx(float(loss1), rel=1e-4, abs=1e-5)


def test_usage_plus_negative_kl_is_minus_mutual_information():
    # The KL to uniform splits into (log K - H(q_avg)) + I(x; code), so a usage weight u with a KL
    # weight -u leaves -u * I(x; code) per position (info-max: spread codes over the batch,
    # confident at each position; an objective the shapes dVAE once used, docs/dvae.md).
    rng = np.random.default_rng(0)
    x = jnp.asarray(mapped_images(3, size=8))
    stats = jnp.asarray(rng.normal(size=(3, 8, 8, 6)), jnp.float32)
    logits = jnp.asarray(rng.normal(size=(3, 2, 2, 16)) * 2, jnp.float32)
    u = 3.0
    base, _ = dvae_loss.dvae_objective(x, logits, stats, kl_w=0.0, recon_loss="mse")
    loss, _ = dvae_loss.dvae_objective(x, logits, stats, kl_w=-u, recon_loss="mse", usage_w=u)
    q = np.asarray(jax.nn.softmax(logits, axis=-1)).reshape(-1, 16)
    avg = q.mean(0)
    mutual_info = -np.sum(avg * np.log(avg)) - np.mean(-np.sum(q * np.log(q), axis=-1))
    positions, dims = 4, 8 * 8 * 3
    np.testing.assert_allclose(float(loss - base), -u * positions * mutual_info / dims, rtol=1e-4, atol=1e-7)


def test_encoder_logit_norm_is_opt_in_and_feeds_the_logit_conv():
    x = jnp.asarray(mapped_images(2, size=16))
    m = tiny_model_config(width_multipliers=(1, 2))
    assert not m.encoder_logit_norm  # off by default: OpenAI's param tree (convert_dvae) is unchanged
    assert "output_norm" not in init(dvae_lib.make_dvae(m), x)["encoder"]
    m.encoder_logit_norm = True
    model = dvae_lib.make_dvae(m)
    params = init(model, x)
    assert params["encoder"]["output_norm"]["scale"].shape == (16,)
    encode = jax.jit(lambda p: model.apply({"params": p}, x, method=dvae_lib.DVAE.encode))
    assert float(jnp.std(encode(params), axis=(1, 2)).mean()) > 1e-3
    # With the norm's scale and bias at zero every position's logits are the output conv's bias:
    # the norm sits between the features and the logit conv.
    zeroed = jax.tree.map(lambda v: v, params)
    zeroed["encoder"]["output_norm"] = jax.tree.map(jnp.zeros_like, params["encoder"]["output_norm"])
    bias = params["encoder"]["output"]["bias"]
    np.testing.assert_allclose(encode(zeroed), jnp.broadcast_to(bias, (2, 8, 8, 64)), atol=1e-6)


# configs/dvae_shapes.py's param tree (OpenAI's model at small size, 256 codes) as
# "module: leaf shape, ...": workdirs trained with it (`make demo`'s among them) load only while it
# stays this.
SHAPES_DVAE_TREE = """\
decoder/group_1/block_1/conv_1: bias 64, kernel 1x1x64x64
decoder/group_1/block_1/conv_2: bias 64, kernel 3x3x64x64
decoder/group_1/block_1/conv_3: bias 64, kernel 3x3x64x64
decoder/group_1/block_1/conv_4: bias 256, kernel 3x3x64x256
decoder/group_1/block_1/id_path: bias 256, kernel 1x1x64x256
decoder/group_2/block_1/conv_1: bias 32, kernel 1x1x256x32
decoder/group_2/block_1/conv_2: bias 32, kernel 3x3x32x32
decoder/group_2/block_1/conv_3: bias 32, kernel 3x3x32x32
decoder/group_2/block_1/conv_4: bias 128, kernel 3x3x32x128
decoder/group_2/block_1/id_path: bias 128, kernel 1x1x256x128
decoder/group_3/block_1/conv_1: bias 16, kernel 1x1x128x16
decoder/group_3/block_1/conv_2: bias 16, kernel 3x3x16x16
decoder/group_3/block_1/conv_3: bias 16, kernel 3x3x16x16
decoder/group_3/block_1/conv_4: bias 64, kernel 3x3x16x64
decoder/group_3/block_1/id_path: bias 64, kernel 1x1x128x64
decoder/group_4/block_1/conv_1: bias 8, kernel 1x1x64x8
decoder/group_4/block_1/conv_2: bias 8, kernel 3x3x8x8
decoder/group_4/block_1/conv_3: bias 8, kernel 3x3x8x8
decoder/group_4/block_1/conv_4: bias 32, kernel 3x3x8x32
decoder/group_4/block_1/id_path: bias 32, kernel 1x1x64x32
decoder/input: bias 64, kernel 1x1x256x64
decoder/output: bias 6, kernel 1x1x32x6
encoder/group_1/block_1/conv_1: bias 8, kernel 3x3x32x8
encoder/group_1/block_1/conv_2: bias 8, kernel 3x3x8x8
encoder/group_1/block_1/conv_3: bias 8, kernel 3x3x8x8
encoder/group_1/block_1/conv_4: bias 32, kernel 1x1x8x32
encoder/group_2/block_1/conv_1: bias 16, kernel 3x3x32x16
encoder/group_2/block_1/conv_2: bias 16, kernel 3x3x16x16
encoder/group_2/block_1/conv_3: bias 16, kernel 3x3x16x16
encoder/group_2/block_1/conv_4: bias 64, kernel 1x1x16x64
encoder/group_2/block_1/id_path: bias 64, kernel 1x1x32x64
encoder/group_3/block_1/conv_1: bias 32, kernel 3x3x64x32
encoder/group_3/block_1/conv_2: bias 32, kernel 3x3x32x32
encoder/group_3/block_1/conv_3: bias 32, kernel 3x3x32x32
encoder/group_3/block_1/conv_4: bias 128, kernel 1x1x32x128
encoder/group_3/block_1/id_path: bias 128, kernel 1x1x64x128
encoder/group_4/block_1/conv_1: bias 64, kernel 3x3x128x64
encoder/group_4/block_1/conv_2: bias 64, kernel 3x3x64x64
encoder/group_4/block_1/conv_3: bias 64, kernel 3x3x64x64
encoder/group_4/block_1/conv_4: bias 256, kernel 1x1x64x256
encoder/group_4/block_1/id_path: bias 256, kernel 1x1x128x256
encoder/input: bias 32, kernel 7x7x3x32
encoder/output: bias 256, kernel 1x1x256x256
"""


def param_tree(model_config, size=64):
    abstract = jax.eval_shape(
        dvae_models.make_dvae(model_config).init, jax.random.key(0), jnp.zeros((1, size, size, 3))
    )
    modules = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract["params"]))[0]:
        keys = [k.key for k in path]
        shape = "x".join(map(str, leaf.shape))
        modules.setdefault("/".join(keys[:-1]), []).append(f"{keys[-1]} {shape}")
    return "".join(f"{m}: {', '.join(leaves)}\n" for m, leaves in modules.items())


def test_shapes_dvae_param_tree_is_fixed_and_openais():
    config = load_config("dvae_shapes")
    assert param_tree(config.model) == SHAPES_DVAE_TREE
    assert type(dvae_models.make_dvae(config.model)) is dvae_lib.DVAE
    assert dvae_models.experiment(config.model) is None


def test_shapes_config_schedules_follow_total_steps():
    config = load_config("dvae_shapes")
    m = config.model
    assert m.temperature_anneal_steps == m.usage_weight_steps == config.total_steps
    assert m.kl_weight_ramp_steps == config.total_steps // 4  # beta ramps up over the first quarter
    config.total_steps = 9600
    assert m.temperature_anneal_steps == m.usage_weight_steps == 9600 and m.kl_weight_ramp_steps == 2400
    m.temperature_anneal_steps = 500  # one schedule overridden alone: nothing else moves
    assert config.total_steps == 9600 and m.kl_weight_ramp_steps == 2400 and m.temperature_anneal_steps == 500
    assert '"temperature_anneal_steps": 500' in config.to_json()


def test_grad_accumulation_refused_with_the_usage_penalty():
    """The usage penalty is a function of the whole batch's average code distribution, so the
    mean over micro-batches would change it: the trainer refuses, naming the term."""
    import optax

    from core_jax import trainer
    from core_jax.config import ConfigError
    from dalle_jax.dvae_task import make_task

    config = load_config("dvae_shapes")
    assert config.model.usage_weight > 0
    config.grad_accum_steps = 2
    with pytest.raises(ConfigError, match=r"grad_accum_steps=2 .*model.usage_weight.*grad_accum_steps=1"):
        trainer.build_train_step(make_task(config), optax.sgd(0.1), lambda s: 0.1, config)
    config.model.usage_weight = config.model.usage_weight_end = 0.0
    assert make_task(config).accumulation == "mean"  # reconstruction and KL are means over images
    config.model.usage_weight_end = 0.3  # a schedule that reaches a non-zero weight later
    assert make_task(config).accumulation == "refuse"
