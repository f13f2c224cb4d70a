"""DALL-E transformer: shapes, loss, mask use, scan/unrolled/remat equality, paper-scale build, task."""

import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_jax import sharding
from dalle_jax import dalle_task, masks, run_config
from dalle_jax.transformer import (
    DalleConfig,
    DalleTransformer,
    count_params,
    init_params,
    input_stream,
    loss_and_metrics,
)
from tests.testfiles import load_config


@functools.partial(jax.jit, static_argnums=(0, 3))
def apply(cfg, params, ids, heads="split"):
    return DalleTransformer(cfg).apply({"params": params}, ids, heads=heads)


@functools.partial(jax.jit, static_argnums=(0,))
def loss(cfg, params, text, image, row_weight=None):
    return loss_and_metrics(
        params, cfg, text, image, text_loss_weight=0.125, image_loss_weight=0.875, row_weight=row_weight
    )


def tiny(kinds=("row", "column", "conv"), **kw):
    base = dict(
        text_len=3,
        text_vocab_size=11,
        image_grid=3,
        image_vocab_size=13,
        d_model=16,
        num_heads=2,
        head_dim=8,
        num_layers=len(kinds),
        mlp_dim=32,
        layer_kinds=tuple(kinds),
        conv_kernel=3,
    )
    base.update(kw)
    return DalleConfig(**base)


def abstract_params(cfg):
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))  # boxed, no compile


def random_params(cfg, seed=0, scale=0.3):
    """Random params of the model's shapes, filled on the host (a jitted init compiles slowly on
    CPU); biases and LayerNorms are non-trivial so every path matters."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        value = scale * rng.standard_normal(leaf.shape).astype(np.float32)
        return jnp.asarray(value + (1.0 if path[-1].key == "scale" else 0.0))

    return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(abstract_params(cfg)))


def batch_for(cfg, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, cfg.total_text_vocab, (batch, cfg.text_len)).astype(np.int32),
        rng.integers(0, cfg.image_vocab_size, (batch, cfg.num_image_tokens)).astype(np.int32),
    )


def test_shapes_and_loss():
    cfg = tiny()
    params = random_params(cfg)
    text, image = batch_for(cfg, batch=3)
    text_logits, image_logits = apply(cfg, params, input_stream(text, image))
    assert text_logits.shape == (3, cfg.text_len, cfg.total_text_vocab)
    assert image_logits.shape == (3, cfg.num_image_tokens, cfg.image_vocab_size)
    assert text_logits.dtype == image_logits.dtype == jnp.float32
    ones = jnp.ones((3,))
    total, m = loss(cfg, params, text, image, ones)
    # independent cross-entropy from the logits
    lp_t = jax.nn.log_softmax(text_logits)
    lp_i = jax.nn.log_softmax(image_logits)
    ce_t = -np.mean(np.take_along_axis(np.asarray(lp_t), text[..., None], -1))
    ce_i = -np.mean(np.take_along_axis(np.asarray(lp_i), image[..., None], -1))
    np.testing.assert_allclose(m["text_loss"], ce_t, rtol=1e-5)
    np.testing.assert_allclose(m["image_loss"], ce_i, rtol=1e-5)
    np.testing.assert_allclose(total, 0.125 * ce_t + 0.875 * ce_i, rtol=1e-5)
    np.testing.assert_allclose(m["image_bits_per_dim"], ce_i / math.log(2), rtol=1e-5)
    # row weights: a zero-weight row leaves the loss equal to the loss of the other rows
    other_text, other_image = batch_for(cfg, batch=3, seed=1)
    other_text[:2], other_image[:2] = text[:2], image[:2]
    weights = jnp.array([1.0, 1.0, 0.0])
    np.testing.assert_allclose(
        loss(cfg, params, text, image, weights)[0],
        loss(cfg, params, other_text, other_image, weights)[0],
        rtol=1e-6,
    )
    assert abs(float(loss(cfg, params, other_text, other_image, ones)[0]) - float(total)) > 1e-3


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("kind", masks.KINDS)
def test_one_layer_reads_exactly_its_mask(kind, legacy):
    """Perturbing the input at position q changes the output at p iff the mask lets p read q
    (or p == q, through the residual): the model applies the mask it claims."""
    cfg = tiny((kind,), image_grid=4, legacy_masks=legacy)
    params = random_params(cfg)
    text, image = batch_for(cfg, batch=1)
    ids = np.asarray(input_stream(text, image))[0]
    T = cfg.seq_len
    rows = np.tile(ids, (T + 1, 1))
    for q in range(1, T):  # position 0 is BOS, a parameter, not an input
        vocab = cfg.total_text_vocab if q <= cfg.text_len else cfg.image_vocab_size
        rows[q + 1, q] = (rows[q + 1, q] + 1) % vocab
    hidden = apply(cfg, params, jnp.asarray(rows), "image")
    changed = np.abs(np.asarray(hidden[1:] - hidden[:1])).max(-1) > 1e-6  # [q, p]
    expected = masks.stream_mask(kind, cfg.text_len, cfg.image_grid, cfg.conv_kernel, legacy).T | np.eye(
        T, dtype=bool
    )
    np.testing.assert_array_equal(changed[1:], expected[1:])


def _unrolled_from_scanned(params, num_layers):
    stacked = params["layers"]["scan"]["block"]
    out = {k: v for k, v in params.items() if k != "layers"}
    out["layers"] = {f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers)}
    return out


def test_scan_unrolled_remat_agree():
    cfg = tiny(("row", "conv"))
    params = random_params(cfg)
    text, image = batch_for(cfg)
    ids = input_stream(text, image)
    ref = apply(cfg, params, ids)
    unrolled_cfg = cfg.replace(scan_layers=False)
    unrolled = _unrolled_from_scanned(params, cfg.num_layers)
    assert jax.tree.structure(unrolled) == jax.tree.structure(nn.meta.unbox(abstract_params(unrolled_cfg)))
    for c, p in ((unrolled_cfg, unrolled), (cfg.replace(remat="full"), params)):
        out = apply(c, p, ids)
        for a, b in zip(ref, out):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # gradients through scan + remat match the unrolled ones
    grad = jax.jit(jax.grad(lambda p, c: loss(c, p, text, image)[0]), static_argnums=1)
    g_scan = grad(params, cfg.replace(remat="full"))
    g_unrolled = grad(unrolled, unrolled_cfg)
    np.testing.assert_allclose(
        _unrolled_from_scanned(g_scan, cfg.num_layers)["layers"]["layer_1"]["attn"]["key_kernel"],
        g_unrolled["layers"]["layer_1"]["attn"]["key_kernel"],
        rtol=1e-4,
        atol=1e-6,
    )


def test_every_param_is_annotated_and_bf16_runs():
    cfg = tiny(dtype="bfloat16")
    boxed = abstract_params(cfg)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(l, nn.Partitioned) for l in leaves)
    names = {n for l in leaves for n in l.names}
    rules = dict(sharding.LOGICAL_AXIS_RULES)
    assert names <= set(rules) | {None}
    qkv = boxed["layers"]["scan"]["block"]["attn"]["query_kernel"]
    assert qkv.names == ("layers", "embed", "heads", "kv")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.meta.unbox(boxed)))
    params = random_params(cfg)
    text, image = batch_for(cfg)
    loss16, _ = loss(cfg, params, text, image)
    loss32, _ = loss(cfg.replace(dtype="float32"), params, text, image)
    assert np.isfinite(loss16) and abs(float(loss16) - float(loss32)) < 0.05


def test_paper_config_builds_abstractly():
    config = load_config("dalle_paper")
    cfg = DalleConfig.from_config(config)
    assert (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.d_model) == (64, 62, 64, 3968)
    assert (cfg.text_len, cfg.num_image_tokens, cfg.text_vocab_size, cfg.image_vocab_size) == (
        256,
        1024,
        16384,
        8192,
    )
    assert cfg.layer_kinds[1] == "column" and cfg.layer_kinds[2] == "row" and cfg.layer_kinds[-1] == "conv"
    abstract = abstract_params(cfg)
    n = count_params(abstract)
    # 64 layers x 12 d^2 (= 12.09B) + embeddings and heads (~0.2B)
    assert 12.0e9 < n < 12.5e9, n
    kernel = abstract["layers"]["scan"]["block"]["attn"]["query_kernel"]
    assert kernel.value.shape == (64, 3968, 62, 64)


def test_sharded_loss_matches_unsharded():
    cfg = tiny(num_heads=2)
    boxed = abstract_params(cfg)
    params = random_params(cfg)
    text, image = batch_for(cfg, batch=4)
    fn = lambda p, t, i: loss(cfg, p, t, i)[0]
    ref = fn(params, text, image)
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    shardings = nn.meta.unbox(sharding.tree_shardings(mesh, boxed))
    sharded = jax.device_put(params, shardings)
    assert sharded["layers"]["scan"]["block"]["attn"][
        "query_kernel"
    ].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    with jax.set_mesh(mesh):
        out = fn(
            sharded,
            jax.device_put(text, sharding.batch_sharding(mesh, 2)),
            jax.device_put(image, sharding.batch_sharding(mesh, 2)),
        )
    np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_config_errors():
    with pytest.raises(ValueError, match="odd"):
        tiny(("conv",), conv_kernel=4)
    with pytest.raises(ValueError, match="positive"):
        tiny(d_model=0)
    with pytest.raises(ValueError, match="whole stream"):
        cfg = tiny()
        DalleTransformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


class FakeDVAE:
    """Stands in for dalle_jax.dvae_api.DVAE: 4x4 grid, codes = quantised mean brightness."""

    grid_size, vocab_size = 4, 16

    def encode(self, images):
        x = np.asarray(images, np.float32).mean(-1)
        b, h, w = x.shape
        pooled = x.reshape(b, 4, h // 4, 4, w // 4).mean((2, 4))
        return np.clip(pooled / 256 * 16, 0, 15).astype(np.int32)

    def decode(self, tokens):
        t = np.asarray(tokens)
        return np.repeat(np.repeat(t * 16, 4, 1), 4, 2)[..., None].repeat(3, -1).astype(np.uint8)


def test_task_trains_with_the_trainer(tmp_path, monkeypatch):
    """make_task end to end: BPE trained into the workdir, on-the-fly dVAE encoding, caption
    dropout, the shared trainer, the eval-loss evaluator and sampled images."""
    from core_jax import trainer
    from core_jax.data import shapes

    config = load_config("dalle_shapes")
    m = config.model
    m.image_grid, m.image_vocab_size = 4, 16
    m.d_model, m.num_heads, m.head_dim, m.num_layers, m.mlp_dim = 32, 2, 16, 2, 64
    m.attention_pattern, m.conv_kernel, m.caption_dropout, m.eval_max_batches = "row,conv", 3, 0.5, 1
    config.batch_size, config.total_steps, config.log_every = 8, 2, 1
    config.eval_every = config.checkpoint_every = 2
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    config.dvae_workdir = str(tmp_path)  # FakeDVAE ignores it
    monkeypatch.setattr(run_config, "load_dvae", lambda workdir, cfg: FakeDVAE())
    monkeypatch.setattr(run_config, "check_dvae_workdir", lambda workdir: None)  # no dVAE workdir
    workdir = str(tmp_path / "run")
    task = dalle_task.make_task(config, workdir)
    vocab = task.config.model.text_vocab_size  # resolved from the BPE trained into the workdir
    assert vocab > 0 and config.model.text_vocab_size == 0  # the config passed in is left as it was
    ex = task.example_fn(shapes.make_example("train", 0), np.random.default_rng(0))
    assert ex["text"].shape == (16,) and ex["image"].shape == (64, 64, 3)
    # Images become tokens per batch (one encoder call), on the host before the step.
    tokens = task.batch_fn({k: v[None] for k, v in ex.items()})
    assert tokens["image_tokens"].shape == (1, 16) and "image" not in tokens
    assert ex["text"][-1] == vocab + 15  # per-position pad
    logged = []
    scalars = trainer.train(config, workdir, task, log_fn=logged.append)
    assert np.isfinite(scalars["loss"]) and 0.0 <= scalars["captions_dropped"] <= 1.0
    assert os.path.exists(os.path.join(workdir, "tokenizer", "merges.txt"))
    from core_jax.checkpoint import read_config  # sampling rebuilds the model from config.json

    assert read_config(workdir).model.text_vocab_size == vocab
    assert any("eval" in line and "image_loss" in line for line in logged), logged
    assert os.path.exists(os.path.join(workdir, "images", "samples_0000002.png"))


def test_resolve_run_checks_first_and_leaves_the_config_alone(tmp_path):
    import dataclasses

    from core_jax.errors import ConfigError

    config = load_config("dalle_shapes")
    config.model.caption_dropout = 1.0
    with pytest.raises(ConfigError, match=r"^config.model.caption_dropout must be in \[0, 1\), got 1.0$"):
        run_config.resolve_run(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")  # refused before a tokenizer is trained into it
    config.model.caption_dropout, config.model.text_vocab_size = 0.3, 40
    before = config.to_dict()
    run = run_config.resolve_run(config, None)  # abstract: shapes only, nothing trained or loaded
    assert run.abstract and run.dvae is None and run.cfg.text_vocab_size == 40
    assert (run.caption_dropout, run.text_loss_weight, run.image_loss_weight) == (0.3, 0.125, 0.875)
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.caption_dropout = 0.5
    with pytest.raises(AttributeError):
        run.config.model.caption_dropout = 0.5
    assert config.to_dict() == before


def test_caption_dropout_is_decided_per_example(tmp_path, monkeypatch):
    """Dropout is a property of the example (its rng: seed, index, epoch), not of its row in the
    batch: the same record is dropped or kept wherever it lands, dropped rows carry the all-pad
    text and leave the text term, and eval examples are never dropped."""
    from core_jax.data import shapes

    config = load_config("dalle_shapes")
    config.model.image_grid, config.model.image_vocab_size = 4, 16
    config.model.caption_dropout = 0.3
    config.dvae_workdir = str(tmp_path)
    monkeypatch.setattr(run_config, "load_dvae", lambda workdir, cfg: FakeDVAE())
    monkeypatch.setattr(run_config, "check_dvae_workdir", lambda workdir: None)  # no dVAE workdir
    resolved = run_config.resolve_run(config, str(tmp_path / "run"))
    task = dalle_task.make_task(config, str(tmp_path / "run"))
    pads = resolved.cfg.text_vocab_size + np.arange(16)
    raws = [shapes.make_example("train", i) for i in range(200)]

    def run(order):
        return {i: task.example_fn(raws[i], np.random.default_rng([0, i, 0])) for i in order}

    first, shuffled = run(range(200)), run(np.random.default_rng(1).permutation(200))
    kept = np.array([float(first[i]["caption_kept"]) for i in range(200)])
    for i in range(200):
        assert float(shuffled[i]["caption_kept"]) == kept[i]
        np.testing.assert_array_equal(shuffled[i]["text"], first[i]["text"])
        assert (first[i]["text"] == pads).all() == (kept[i] == 0)
    assert 30 <= (kept == 0).sum() <= 90  # Binomial(200, 0.3): mean 60, sd 6.5
    eval_example_fn = dalle_task.make_example_fn(
        resolved, dalle_task.image_tokens_fn(FakeDVAE()), train=False
    )
    assert "caption_kept" not in eval_example_fn(raws[0], np.random.default_rng(0))
    assert "caption_kept" in task.batch_spec(8)

    # The text term averages over kept rows only; the image term over all rows.
    cfg = resolved.cfg
    params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
    rows = [first[i] for i in [*np.flatnonzero(kept == 1)[:5], *np.flatnonzero(kept == 0)[:3]]]
    batch = task.batch_fn({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    _, metrics = task.loss_fn(params, batch, jax.random.key(0), 0)
    _, per_row = jax.vmap(lambda t, im: loss(cfg, params, t[None], im[None]))(
        batch["text"], batch["image_tokens"]
    )
    k = batch["caption_kept"]
    np.testing.assert_allclose(metrics["text_loss"], (per_row["text_loss"] * k).sum() / k.sum(), rtol=1e-5)
    np.testing.assert_allclose(metrics["image_loss"], per_row["image_loss"].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["captions_dropped"], 1 - k.mean(), rtol=1e-6)


def test_grad_accumulation_keeps_the_full_batch_text_term():
    """Under caption dropout the text term divides by the batch's kept captions, which differ
    between micro-batches: the accumulated loss and gradients must still be the full batch's."""
    from core_jax import trainer

    config = load_config("dalle_shapes")
    m = config.model
    m.image_grid, m.image_vocab_size, m.text_vocab_size = 2, 16, 20
    m.text_len = config.text.context_length = 3
    m.d_model, m.num_heads, m.head_dim, m.num_layers, m.mlp_dim = 16, 2, 8, 1, 32
    m.attention_pattern, m.caption_dropout = "row", 0.5
    task = dalle_task.make_task(config, None)  # abstract: no tokenizer, no dVAE
    cfg = DalleConfig.from_config(config)
    params = random_params(cfg)
    text, image = batch_for(cfg, batch=8)
    # Micro-batch j holds rows j, j+k, ...: 4 and 2 kept captions at k=2; 2, 1, 2, 1 at k=4.
    kept = np.array([1, 0, 1, 0, 1, 1, 1, 1], np.float32)
    batch = {"text": text, "image_tokens": image, "caption_kept": kept}

    def grads(accum):
        config.grad_accum_steps = accum
        return jax.jit(trainer.build_grads_fn(task, config))(params, batch, jax.random.key(0), 0)

    ref_loss, ref_metrics, ref_grads = grads(1)
    for accum in (2, 4):
        loss, metrics, g = grads(accum)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        for key in ("text_loss", "image_loss", "captions_dropped"):
            np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g, ref_grads)


def _old_sparse_workdir(path):
    """A DALL-E workdir as older versions wrote it: row/column/conv masks, no model.legacy_masks."""
    import json
    from core_jax.checkpoint import save_params

    config = load_config("dalle_shapes", "paper_masks")
    m = config.model
    m.image_grid, m.image_vocab_size, m.text_vocab_size = 4, 16, 40
    m.d_model, m.num_heads, m.head_dim, m.mlp_dim = 16, 2, 8, 32
    save_params(path, config, random_params(DalleConfig.from_config(config)))
    recorded = json.load(open(os.path.join(path, "config.json")))
    del recorded["model"]["legacy_masks"]
    json.dump(recorded, open(os.path.join(path, "config.json"), "w"))
    return config


def test_resume_and_init_from_refuse_checkpoints_of_the_old_masks(tmp_path):
    from core_jax.config import ConfigError

    old = str(tmp_path / "old")
    config = _old_sparse_workdir(old)
    assert config.model.legacy_masks is False
    fix = r"rerun with --config\.model\.legacy_masks=True, or retrain from scratch in a new --workdir$"
    with pytest.raises(ConfigError, match=rf"^the params in {old} were trained with the old .*; {fix}"):
        dalle_task.make_task(config, old)  # resuming it: what the trainer's entry point runs first
    config.init_from = old
    with pytest.raises(ConfigError, match=rf"^the params in {old} \(config.init_from\) were .*; {fix}"):
        dalle_task.make_task(config, str(tmp_path / "new"))
    config.model.legacy_masks = True  # the fix: continue on the masks they were trained with
    run_config.check_trained_masks(config, old)
    run_config.check_trained_masks(config, str(tmp_path / "new"))
    config.model.attention_pattern = "full"  # a run that does not use the sparse masks: unaffected
    config.model.legacy_masks = False
    run_config.check_trained_masks(config, old)
