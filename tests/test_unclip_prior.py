"""The unCLIP diffusion prior: sharded training == one device, exact resume with the stored
embedding statistics, the prefix KV cache against full recomputation, caption dropout, guidance at
scale 1, best-of-n, embedding shards, the CLIs' bad input and the analytic parameter count.

Everything is tiny (a prior of width 16, a random CLIP of width 16 with 8-dim embeddings), so the
cost is compiling, not running.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_jax import checkpoint, sharding, trainer
from core_jax import data as data_lib
from dalle_jax.unclip import embedding_stats, prior, prior_sample, prior_task, samplers
from dalle_jax.unclip.api import Prior
from dalle_jax.unclip.encode_embeddings import encode_split
from tests.testfiles import load_config, run_module
from tests.workdirs import random_params, tiny_clip_workdir

STEPS = 4
LEARNING_RATE = 3e-3


def tiny_prior_config(clip_workdir, mesh=(1, 1, 1)):
    c = load_config("unclip_prior_shapes")
    m = c.model
    m.width, m.num_layers, m.num_heads = 16, 1, 2
    # Statistics from one batch of 8: the CLIP compiles once for them and for training.
    m.stats_examples, m.eval_max_batches, m.eval_sample_batches = 8, 0, 0
    c.batch_size, c.total_steps, c.log_every = 8, STEPS, 1
    c.eval_every, c.checkpoint_every = 1000, 2
    c.optim.warmup_steps, c.optim.learning_rate = 1, LEARNING_RATE
    c.data.shapes_train_size = 64
    c.ema_decay = 0.9
    c.clip_workdir = clip_workdir
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return c


@pytest.fixture(scope="module")
def clip_workdir(tmp_path_factory):
    return tiny_clip_workdir(str(tmp_path_factory.mktemp("clip")), image_size=16)


def train_prior(workdir, clip_workdir, mesh=(1, 1, 1), config=None, **kwargs):
    config = config or tiny_prior_config(clip_workdir, mesh)
    devices = jax.devices()[:1] if mesh == (1, 1, 1) else None
    task = prior_task.make_task(config, workdir)
    trainer.train(config, workdir, task, devices=devices, log_fn=lambda line: None, **kwargs)
    return workdir


def losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def raw_params(workdir):
    return jax.tree.map(np.asarray, checkpoint.load_params(workdir, ema=False)[1])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, clip_workdir):
    """One uninterrupted 4-step prior run on one device."""
    return train_prior(str(tmp_path_factory.mktemp("prior") / "full"), clip_workdir)


def test_prior_on_a_2x2x2_mesh_matches_one_device(tmp_path, full_run, clip_workdir):
    ref = losses(full_run)
    assert sorted(ref) == list(range(1, STEPS + 1)) and len(set(ref.values())) == STEPS, ref
    config = tiny_prior_config(clip_workdir, (2, 2, 2))
    config.checkpoint_every = STEPS
    sharded = train_prior(str(tmp_path / "mesh"), clip_workdir, mesh=(2, 2, 2), config=config)
    got = losses(sharded)
    # Split reductions sum in another order: float32 noise; a wrong shard is off by O(1).
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=1e-5)
    # Adam moves a weight by up to ~lr per step whatever the size of its gradient, so float noise
    # on a zero gradient moves it by that much; a wrong shard moves weights by O(lr). Key biases
    # have an exactly zero gradient (q.b shifts a whole softmax row), so they are left out.
    one, mesh = raw_params(full_run), raw_params(sharded)
    del (
        one["layers"]["scan"]["block"]["attn"]["key_bias"],
        mesh["layers"]["scan"]["block"]["attn"]["key_bias"],
    )
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(mesh)))
    assert diff < 0.01 * STEPS * LEARNING_RATE, diff
    assert checkpoint.workdir_has_ema(sharded)


def test_resume_is_bit_exact_and_reuses_the_stored_statistics(tmp_path, full_run, clip_workdir, monkeypatch):
    workdir = train_prior(str(tmp_path / "resumed"), clip_workdir, stop_at_step=2)
    assert sorted(losses(workdir)) == [1, 2]
    stored = embedding_stats.load_stats(workdir, 8)
    assert int(stored["count"]) == 8 and str(stored["clip_workdir"]) == clip_workdir
    # Measured on unit embeddings: means inside the unit ball, spreads well below 1.
    assert np.linalg.norm(stored["image_mean"]) < 1 and 0 < stored["image_std"].max() < 1

    def measure_again(*args):
        raise AssertionError("a resumed run measured the statistics again")

    monkeypatch.setattr(prior_task, "measure_stats", measure_again)
    train_prior(workdir, clip_workdir)
    assert losses(workdir) == losses(full_run)
    for a, b in zip(jax.tree.leaves(raw_params(workdir)), jax.tree.leaves(raw_params(full_run))):
        np.testing.assert_array_equal(a, b)
    # Statistics measured for another CLIP are refused, not silently reused.
    config = tiny_prior_config(str(tmp_path / "another_clip"))
    config.model.clip_dim, config.clip_step = 8, 0
    with pytest.raises(prior_task.ConfigError, match="was measured with clip_workdir="):
        prior_task.run_stats(config, workdir, embed=None, example_fn=None)


def tiny_spec(**kw):
    return prior.PriorSpec(
        width=16, num_layers=2, num_heads=2, clip_dim=8, text_width=16, text_length=6, **kw
    )


def random_condition(n, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 7, n)
    return {
        "text_states": rng.standard_normal((n, 6, 16)).astype(np.float32),
        "text_mask": np.arange(6)[None] < lengths[:, None],
        "text_embedding": rng.standard_normal((n, 8)).astype(np.float32),
    }


def test_prefix_cache_equals_full_recomputation():
    spec = tiny_spec()
    model = prior.PriorTransformer(spec)
    params = jax.tree.map(jnp.asarray, random_params(prior.abstract_params(model), 4, 0.3))
    cond = random_condition(5)
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    t = np.array([0, 10, 300, 700, 999], np.int32)
    kept = np.array([1, 0, 1, 1, 0], np.float32)
    apply = jax.jit(lambda x, t, cond, kept: model.apply({"params": params}, x, t, **cond, caption_kept=kept))
    full = apply(x, t, cond, kept)
    cached = jax.jit(
        lambda x, t, cond: prior_sample.cached_model_fn(model, params)(
            x, t, prior_sample.cached_prefix(model, params, cond)
        )
    )(x, t, dict(cond, caption_kept=kept))
    np.testing.assert_allclose(cached, full, atol=1e-5, rtol=1e-5)
    # Hidden caption tokens are never read: changing them leaves the prediction as it was.
    changed = dict(cond, text_states=np.where(cond["text_mask"][..., None], cond["text_states"], 5.0))
    np.testing.assert_array_equal(apply(x, t, changed, kept), full)
    # A dropped caption reads neither its tokens nor its embedding: rows 1 and 4 (same x and t
    # here) give the same prediction.
    other = random_condition(5, 9)
    dropped = apply(x[[1, 1, 1, 1, 1]], t[[1, 1, 1, 1, 1]], other, np.zeros(5, np.float32))
    np.testing.assert_allclose(dropped, np.broadcast_to(full[1], dropped.shape), atol=1e-6)
    # Whole samplers, guided: the cached and recomputed paths agree.
    sched = prior_task.noise_schedule(load_config("unclip_prior_shapes"))

    def draw(use_cache):
        fn = lambda cond, x: prior_sample.sample_prior(
            model,
            sched,
            params,
            cond,
            x,
            jax.random.key(0),
            sampler="ddim",
            steps=4,
            cond_scale=3.0,
            use_cache=use_cache,
        )
        return jax.jit(fn)(cond, x)

    np.testing.assert_allclose(draw(True), draw(False), atol=1e-5, rtol=1e-5)


def test_caption_dropout_rate_matches_the_config(clip_workdir):
    """1024 training examples drop their caption ~10% of the time (unCLIP section 2.2), each from
    its own rng."""
    config = tiny_prior_config(clip_workdir)
    clip = prior_task.load_clip(config)
    prior_task.resolve_clip_sizes(config, clip)
    example_fn = prior_task.make_example_fn(config, clip.tokenizer, train=True, shards=False)
    n = 1024
    it = data_lib.make_iterator(config.data, "train", global_batch_size=n, seed=3, example_fn=example_fn)
    batch = next(it)
    it.close()
    rate = float(config.model.caption_dropout)
    dropped = 1.0 - (batch["caption_kept"] > 0).mean()
    # 4.5 binomial standard deviations: a false alarm about once in 10^5 runs.
    assert abs(dropped - rate) < 4.5 * np.sqrt(rate * (1 - rate) / n), dropped
    metrics = prior_task.dropout_metrics(jax.tree.map(jnp.asarray, batch))
    assert float(metrics["captions_dropped"]) == pytest.approx(dropped)
    # The host CLIP also runs under the training mesh (an evaluator's), which its params are not on.
    embed = prior_task.make_embed_fn(clip)
    rows = {key: value[:8] for key, value in batch.items()}
    out = embed(rows)
    with jax.set_mesh(sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))):
        under_mesh = embed(rows)
    for key, value in out.items():
        np.testing.assert_array_equal(under_mesh[key], value)


@pytest.fixture(scope="module")
def random_prior(full_run):
    """The trained run's Prior with random weights (four steps leave the weights near their init;
    random ones make every input count)."""
    trained = Prior.load(full_run)
    abstract = prior.abstract_params(trained.model)
    return Prior(
        trained.config,
        jax.tree.map(jnp.asarray, random_params(abstract, 3, 0.3)),
        trained.clip,
        trained.stats,
    )


def test_guidance_at_scale_one_is_the_unguided_sampler(random_prior):
    p = random_prior
    captions = ["a red circle", "a blue square in the top left"]
    cond, _ = p._encode(captions)
    x_T = jax.random.normal(jax.random.key(0), (2, 8), jnp.float32)
    kw = dict(sampler="ddim", steps=3, prediction="x0")

    @jax.jit
    def unguided(params, x_T, rng):
        prefix = prior_sample.cached_prefix(p.model, params, dict(cond, caption_kept=jnp.ones(2)))
        model_fn = prior_sample.cached_model_fn(p.model, params)
        return samplers.sample(lambda x, t: model_fn(x, t, prefix), x_T, rng, p.schedule, **kw)

    def guided(scale):
        fn = lambda params, x_T, rng: prior_sample.sample_prior(
            p.model, p.schedule, params, cond, x_T, rng, cond_scale=scale, **kw
        )
        return jax.jit(fn)(p.params, x_T, jax.random.key(1))

    np.testing.assert_array_equal(guided(1.0), unguided(p.params, x_T, jax.random.key(1)))
    assert not np.allclose(guided(4.0), guided(1.0), atol=1e-3)


def test_best_of_keeps_the_largest_dot_product(random_prior):
    candidates = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, 8)), jnp.float32)
    text = jnp.asarray(np.random.default_rng(1).standard_normal((3, 8)), jnp.float32)
    best, index = prior_sample.best_by_text(candidates, text)
    scores = np.einsum("nke,ne->nk", candidates, text)
    np.testing.assert_array_equal(index, scores.argmax(1))
    np.testing.assert_array_equal(best, np.asarray(candidates)[np.arange(3), scores.argmax(1)])
    # Through the API: best of 2 is, per caption, the one of its two candidates (drawn from the
    # same noise rows with best_of=1) closer to the caption's text embedding.
    p, captions = random_prior, ["a red circle", "a green triangle"]
    two = p.sample(captions, best_of=2, sampler="ddim", steps=3, seed=2)
    cond, text = p._encode(captions)
    rows = {k: np.repeat(v, 2, axis=0) for k, v in cond.items()}
    x_T = jax.random.normal(jax.random.fold_in(jax.random.key(2), 0), (4, 8), jnp.float32)
    args = dict(
        sampler="ddim", steps=3, cond_scale=float(p.config.sample.cond_scale), eta=0.0, use_cache=True
    )
    every = np.asarray(
        p._sample(
            p.params,
            rows,
            np.repeat(text, 2, 0),
            x_T,
            jax.random.fold_in(jax.random.key(2), 1),
            best_of=1,
            **args,
        )
    ).reshape(2, 2, 8)
    pick = np.einsum("nke,ne->nk", every, text).argmax(1)
    np.testing.assert_allclose(two, every[np.arange(2), pick], atol=1e-6)
    assert not np.allclose(every[:, 0], every[:, 1])


def test_embedding_shards_feed_the_prior(tmp_path, clip_workdir):
    """encode_embeddings' shards read back through data.embeddings_dir: the same embeddings the
    CLIP gives, the statistics taken from the shards' file."""
    from clip_jax.api import CLIPModel

    config = tiny_prior_config(clip_workdir)
    clip = CLIPModel.load(clip_workdir)
    out = str(tmp_path / "emb")
    os.makedirs(out)
    info, acc = encode_split(
        clip, config.data, "train", out, shard_size=5, batch_size=4, num_examples=12, log=lambda s: None
    )
    assert info["examples"] == 12 and len(info["shards"]) == 3
    index = {
        "clip_dim": 8,
        "text_length": 16,
        "clip_workdir": os.path.abspath(clip_workdir),
        "clip_step": 0,
        "splits": {"train": info},
    }
    json.dump(index, open(os.path.join(out, "index.json"), "w"))
    embedding_stats.save_stats(out, acc.result())
    config.data.embeddings_dir = out
    task = prior_task.make_task(config, str(tmp_path / "wd"))
    assert config.data.source == "embeddings"
    stored = embedding_stats.load_stats(str(tmp_path / "wd"), 8)
    assert int(stored["count"]) == 12  # the shards' file, not 8 examples measured again
    it = data_lib.make_iterator(
        config.data,
        "train",
        global_batch_size=4,
        seed=0,
        example_fn=prior_task.make_example_fn(config, clip.tokenizer, train=False, shards=True),
        train=False,
    )
    batch = task.batch_fn(next(it))
    it.close()
    raw = data_lib.make_iterator(
        config.data,
        "train",
        global_batch_size=4,
        seed=0,
        example_fn=lambda r, g: {
            "caption": np.asarray(r["caption"]),
            "image_embedding": r["image_embedding"],
        },
        train=False,
    )
    first = next(raw)
    raw.close()
    captions = [str(c) for c in first["caption"]]
    np.testing.assert_allclose(
        embedding_stats.destandardise(batch["target"], stored, "image"), first["image_embedding"], atol=1e-6
    )
    np.testing.assert_allclose(
        embedding_stats.destandardise(batch["text_embedding"], stored, "text"),
        clip.embed_texts(captions),
        atol=1e-5,
    )


def test_bad_input_is_one_line_and_exit_2(tmp_path, full_run):
    decoder = str(tmp_path / "decoder")
    checkpoint.write_config(decoder, load_config("unclip_decoder_shapes"))
    base = ["dalle_jax.unclip.train_prior", "--config", "configs/unclip_prior_shapes.py"]
    missing = run_module(*base, "--workdir", str(tmp_path / "a"))
    encode = run_module(
        "dalle_jax.unclip.encode_embeddings", "--clip_workdir", decoder, "--out_dir", str(tmp_path / "emb")
    )
    for proc, says in [
        (missing, "config.clip_workdir is empty: the prior"),
        (encode, "holds an unCLIP decoder workdir, not a CLIP workdir"),
    ]:
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert lines[0].startswith("error: ") and says in lines[0], lines
    assert not os.path.exists(tmp_path / "a" / "config.json")
    with pytest.raises(ValueError, match="holds an unCLIP decoder workdir, not an unCLIP prior workdir"):
        Prior.load(decoder)
    with pytest.raises(ValueError, match="holds an unCLIP prior workdir, not a CLIP workdir"):
        prior_task.load_clip(tiny_prior_config(full_run))


def test_analytic_param_count_equals_the_built_model():
    for spec in (tiny_spec(), tiny_spec(mlp_ratio=2.5, scan_layers=False)):
        built = trainer.count_params(nn.meta.unbox(prior.abstract_params(prior.PriorTransformer(spec))))
        assert prior.param_count(spec) == built, spec
    # The paper's 1B prior (Table 3), counted on paper only.
    paper = prior_task.prior_spec(load_config("unclip_prior_paper"))
    assert (paper.width, paper.num_layers, paper.num_heads) == (2048, 24, 32)
    assert 1.0e9 < prior.param_count(paper) < 1.3e9
