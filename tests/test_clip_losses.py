"""Contrastive losses: numpy references, global-batch values on sharded meshes, and the chunked
sigmoid loss (values, gradients, metrics, and no [B, B] logits in its compiled program)."""

import re

import jax
import numpy as np
import pytest

from clip_jax import losses
from core_jax import sharding

B, E = 32, 16
MESHES = [(8, 1, 1), (2, 2, 2)]


def features(seed=0, noise=2.0):
    """Text features correlated with their images, so accuracies are neither 0 nor 1."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(B, E)).astype(np.float32)
    txt = img + noise * rng.normal(size=(B, E)).astype(np.float32)
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    return norm(img), norm(txt)


def log_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def numpy_softmax_loss(img, txt, scale):
    logits = scale * img.astype(np.float64) @ txt.T.astype(np.float64)
    diag = np.arange(len(img))
    i2t = -log_softmax(logits, 1)[diag, diag].mean()
    t2i = -log_softmax(logits, 0)[diag, diag].mean()
    acc_i2t = (logits.argmax(1) == diag).mean()
    acc_t2i = (logits.argmax(0) == diag).mean()
    return (i2t + t2i) / 2, acc_i2t, acc_t2i


def numpy_sigmoid_loss(img, txt, scale, bias):
    logits = scale * img.astype(np.float64) @ txt.T.astype(np.float64) + bias
    signs = 2 * np.eye(len(img)) - 1
    return np.sum(np.log1p(np.exp(-signs * logits))) / len(img)


def mesh_of(shape):
    return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))


def put_batch(mesh, *arrays):
    return [jax.device_put(a, sharding.batch_sharding(mesh, a.ndim)) for a in arrays]


def test_softmax_loss_matches_numpy():
    img, txt = features()
    loss, metrics = jax.jit(losses.softmax_loss)(img, txt, 14.0)
    ref, acc_i2t, acc_t2i = numpy_softmax_loss(img, txt, 14.0)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    assert 0.1 < acc_i2t < 1.0  # the data makes accuracy informative
    np.testing.assert_allclose(metrics["i2t_accuracy"], acc_i2t)
    np.testing.assert_allclose(metrics["t2i_accuracy"], acc_t2i)


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_softmax_loss_is_global_on_a_sharded_batch(mesh_shape):
    img, txt = features(1)
    mesh = mesh_of(mesh_shape)
    s_img, s_txt = put_batch(mesh, img, txt)
    assert len(s_img.sharding.device_set) == 8 and not s_img.sharding.is_fully_replicated
    fn = jax.jit(jax.value_and_grad(lambda a, b, s: losses.softmax_loss(a, b, s)[0], argnums=(0, 1, 2)))
    with jax.set_mesh(mesh):
        loss, grads = fn(s_img, s_txt, 20.0)
    ref_loss, ref_grads = jax.jit(
        jax.value_and_grad(lambda a, b, s: losses.softmax_loss(a, b, s)[0], argnums=(0, 1, 2))
    )(img, txt, 20.0)
    np.testing.assert_allclose(loss, numpy_softmax_loss(img, txt, 20.0)[0], rtol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)
    # A per-shard loss (what a naive pmap gives) is a different number: the test can tell.
    local = np.mean([numpy_softmax_loss(img[i : i + 4], txt[i : i + 4], 20.0)[0] for i in range(0, B, 4)])
    assert abs(local - float(loss)) > 1e-2


def test_sigmoid_loss_matches_numpy():
    img, txt = features(2)
    loss, _ = jax.jit(losses.sigmoid_loss)(img, txt, 10.0, -10.0)
    np.testing.assert_allclose(loss, numpy_sigmoid_loss(img, txt, 10.0, -10.0), rtol=1e-5)


def _value_and_grads(fn, *args):
    return jax.jit(jax.value_and_grad(lambda *a: fn(*a)[0], argnums=(0, 1, 2, 3)))(*args)


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_chunked_sigmoid_equals_full(mesh_shape):
    img, txt = features(3)
    scale, bias = np.float32(7.0), np.float32(-2.0)
    full_loss, full_grads = _value_and_grads(losses.sigmoid_loss, img, txt, scale, bias)
    _, full_metrics = jax.jit(losses.sigmoid_loss)(img, txt, scale, bias)
    mesh = mesh_of(mesh_shape)
    s_img, s_txt = put_batch(mesh, img, txt)
    with jax.set_mesh(mesh):
        loss, grads = _value_and_grads(losses.sigmoid_loss_chunked, s_img, s_txt, scale, bias)
        _, metrics = jax.jit(losses.sigmoid_loss_chunked)(s_img, s_txt, scale, bias)
    np.testing.assert_allclose(loss, full_loss, rtol=1e-5)
    np.testing.assert_allclose(loss, numpy_sigmoid_loss(img, txt, 7.0, -2.0), rtol=1e-5)
    for name, g, r in zip(("image", "text", "scale", "bias"), grads, full_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6, err_msg=name)
    assert np.abs(np.asarray(full_grads[1])).max() > 1e-3  # gradients flow to the text features
    for key in ("i2t_accuracy", "t2i_accuracy"):
        np.testing.assert_allclose(metrics[key], full_metrics[key], err_msg=key)
    assert 0.0 < float(full_metrics["i2t_accuracy"]) < 1.0


def test_chunked_sigmoid_never_builds_the_full_logits():
    img, txt = features(4)
    mesh = mesh_of((8, 1, 1))
    s_img, s_txt = put_batch(mesh, img, txt)
    with jax.set_mesh(mesh):
        chunked = jax.jit(jax.grad(lambda a, b: losses.sigmoid_loss_chunked(a, b, 5.0, -1.0)[0]))
        chunked_hlo = chunked.lower(s_img, s_txt).compile().as_text()
        full = jax.jit(jax.grad(lambda a, b: losses.sigmoid_loss(a, b, 5.0, -1.0)[0]))
        full_hlo = full.lower(s_img, s_txt).compile().as_text()
    # Any per-device array with a global-batch dimension: the full loss's [B/8, B] logit rows (or
    # all-gathered [B, E] text features); the chunked loss must only hold [B/8, B/8] blocks.
    global_dim = re.compile(rf"f32\[([0-9]+,)*{B}(,[0-9]+)*\]")
    assert global_dim.search(full_hlo)  # the check sees a full row block when there is one
    assert not global_dim.search(chunked_hlo), global_dim.search(chunked_hlo).group(0)
    assert "f32[4,4]" in chunked_hlo


def test_chunked_without_mesh_is_the_full_loss():
    img, txt = features(5)
    loss, _ = jax.jit(losses.sigmoid_loss_chunked)(img, txt, 3.0, -1.0)
    np.testing.assert_allclose(loss, numpy_sigmoid_loss(img, txt, 3.0, -1.0), rtol=1e-5)


def test_contrastive_loss_dispatch():
    img, txt = features(6)
    feats = {"image": img, "text": txt, "scale": 10.0, "bias": -3.0}
    np.testing.assert_allclose(
        losses.contrastive_loss("softmax", feats)[0], numpy_softmax_loss(img, txt, 10.0)[0], rtol=1e-5
    )
    np.testing.assert_allclose(
        losses.contrastive_loss("sigmoid", feats)[0], numpy_sigmoid_loss(img, txt, 10.0, -3.0), rtol=1e-5
    )
    with pytest.raises(ValueError, match="unknown loss"):
        losses.contrastive_loss("hinge", feats)
