"""The unCLIP decoder and upsampler on the shared trainer: sharded == one device, exact resume,
guidance dropout from each example's rng, the upsampler's blurred low-res input, the train_decoder
CLI's errors, the loading / sampling API and a TPU compile of the decoder's step.

Everything is tiny (16x16 images, U-Nets of width 8, a random CLIP of width 16), so the cost is
compiling, not running.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_jax import checkpoint, sharding, trainer
from core_jax import data as data_lib
from dalle_jax.unclip import decoder_task, pixels, samplers, unet, upsampler_task
from dalle_jax.unclip.api import Decoder
from tests.testfiles import load_config, run_module
from tests.workdirs import random_params, tiny_clip_workdir, tiny_dvae_workdir

STEPS = 4
LEARNING_RATE = 3e-3


def tiny_unet(c):
    m = c.model
    # One level: the fewest blocks (each adds seconds to the step's compile, which dominates here).
    m.model_channels, m.channel_mult, m.num_res_blocks = 8, (1,), 1
    m.head_channels, m.norm_groups, m.eval_max_batches = 8, 4, 0
    c.batch_size, c.total_steps, c.log_every = 8, STEPS, 1
    c.eval_every, c.checkpoint_every = 1000, 2
    c.optim.warmup_steps, c.optim.learning_rate = 1, LEARNING_RATE
    c.sample.preview_images = 0  # no preview: each would compile a sampler
    c.data.shapes_train_size = 64
    return c


def tiny_decoder_config(clip_workdir, mesh=(1, 1, 1)):
    c = tiny_unet(load_config("unclip_decoder_shapes"))
    c.model.image_size, c.model.attention_resolutions = 8, (8,)
    c.ema_decay = 0.9
    c.clip_workdir = clip_workdir
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return c


@pytest.fixture(scope="module", autouse=True)
def persistent_compilation_cache(tmp_path_factory):
    """The one-device runs here (uninterrupted, interrupted, resumed) compile the same steps: a
    persistent cache compiles each once (the tiny decoder's train step takes 30-100 s on 2 cores)."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {key: getattr(jax.config, key) for key in keys}
    jax.config.update(keys[0], str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update(keys[1], 0)
    yield
    for key, value in old.items():
        jax.config.update(key, value)


@pytest.fixture(scope="module")
def clip_workdir(tmp_path_factory):
    return tiny_clip_workdir(str(tmp_path_factory.mktemp("clip")), image_size=16)


def train_decoder(workdir, clip_workdir, mesh=(1, 1, 1), **kwargs):
    config = tiny_decoder_config(clip_workdir, mesh)
    devices = jax.devices()[:1] if mesh == (1, 1, 1) else None
    task = decoder_task.make_task(config, workdir)
    trainer.train(config, workdir, task, devices=devices, log_fn=lambda line: None, **kwargs)
    return workdir


def losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def raw_params(workdir):
    return jax.tree.map(np.asarray, checkpoint.load_params(workdir, ema=False)[1])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, clip_workdir):
    """One uninterrupted 4-step decoder run on one device."""
    return train_decoder(str(tmp_path_factory.mktemp("decoder") / "full"), clip_workdir)


def test_decoder_on_a_2x2x2_mesh_matches_one_device(tmp_path, full_run, clip_workdir):
    ref = losses(full_run)
    assert sorted(ref) == list(range(1, STEPS + 1)) and len(set(ref.values())) == STEPS, ref
    sharded = train_decoder(str(tmp_path / "mesh"), clip_workdir, mesh=(2, 2, 2))
    got = losses(sharded)
    # Split reductions (batch over data x fsdp, convolution channels over fsdp / tensor) sum in
    # another order: float32 noise of ~1e-6 relative per step; a wrong shard is off by O(1).
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=1e-5)
    # Adam moves a weight by up to ~lr per step whatever the size of its gradient, so float noise
    # on a near-zero gradient could move it by that much; a wrong shard moves weights by O(lr).
    # Allowed: 1% of STEPS * lr (1.2e-4); measured: 6e-7.
    one, mesh = raw_params(full_run), raw_params(sharded)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(mesh)))
    assert diff < 0.01 * STEPS * LEARNING_RATE, diff
    assert checkpoint.workdir_has_ema(sharded)


def test_resume_is_bit_exact(tmp_path, full_run, clip_workdir):
    workdir = train_decoder(str(tmp_path / "resumed"), clip_workdir, stop_at_step=2)
    assert sorted(losses(workdir)) == [1, 2]
    train_decoder(workdir, clip_workdir)
    assert losses(workdir) == losses(full_run)
    for a, b in zip(jax.tree.leaves(raw_params(workdir)), jax.tree.leaves(raw_params(full_run))):
        np.testing.assert_array_equal(a, b)


def test_guidance_dropout_rates_and_the_host_batch(clip_workdir):
    """1024 training examples drop the CLIP embedding ~10% and the caption ~50% of the time,
    independently (unCLIP section 2.1), each from its own rng; batch_fn gives unit CLIP
    embeddings, caption states and the area-downsampled target."""
    config = tiny_decoder_config(clip_workdir)
    clip = decoder_task.load_clip(config)
    decoder_task.resolve_clip_sizes(config, clip)
    example_fn = decoder_task.make_example_fn(config, clip.tokenizer, train=True)
    n = 1024
    it = data_lib.make_iterator(config.data, "train", global_batch_size=n, seed=3, example_fn=example_fn)
    batch = next(it)
    it.close()
    clip_kept, caption_kept = batch["clip_kept"] > 0, batch["caption_kept"] > 0
    for kept, rate in [(clip_kept, 0.1), (caption_kept, 0.5), (clip_kept | caption_kept, 0.05)]:
        # 4.5 binomial standard deviations: a false alarm about once in 10^5 runs.
        assert abs((1.0 - kept.mean()) - rate) < 4.5 * np.sqrt(rate * (1 - rate) / n), (rate, kept.mean())
    # The flags are the example's: the same record in another batch (another size) keeps them.
    it = data_lib.make_iterator(config.data, "train", global_batch_size=8, seed=3, example_fn=example_fn)
    small = next(it)
    it.close()
    np.testing.assert_array_equal(small["clip_kept"], batch["clip_kept"][:8])
    np.testing.assert_array_equal(small["caption_kept"], batch["caption_kept"][:8])

    batch_fn = decoder_task.make_batch_fn(clip, 8)
    out = batch_fn(small)
    assert sorted(out) == [
        "caption_kept",
        "clip_embedding",
        "clip_kept",
        "target",
        "text_mask",
        "text_states",
    ]
    np.testing.assert_allclose(np.linalg.norm(out["clip_embedding"], axis=-1), 1.0, rtol=1e-5)
    assert out["text_states"].shape == (8, 16, 16) and out["text_mask"].dtype == bool
    assert out["text_mask"][:, 0].all() and not out["text_mask"].all()  # captions end before 16
    expected = small["image"].reshape(8, 8, 2, 8, 2, 3).mean(axis=(2, 4)) / 127.5 - 1.0
    np.testing.assert_allclose(out["target"], expected, atol=1e-6)
    # Dropped embeddings reach the U-Net as zeros, dropped captions fully masked.
    cond = decoder_task.train_condition(jax.tree.map(jnp.asarray, out))
    dropped = ~(small["clip_kept"] > 0)
    assert not np.asarray(cond["clip_embedding"])[dropped].any()
    assert not np.asarray(cond["text_mask"])[~(small["caption_kept"] > 0)].any()
    # An evaluator runs batch_fn under the training mesh, which the CLIP's params are not on.
    with jax.set_mesh(sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))):
        under_mesh = batch_fn(small)
    for key, value in out.items():
        np.testing.assert_array_equal(under_mesh[key], value)


def test_train_decoder_needs_a_clip_workdir(tmp_path):
    base = ["dalle_jax.unclip.train_decoder", "--config", "configs/unclip_decoder_shapes.py"]
    missing = run_module(*base, "--workdir", str(tmp_path / "a"))
    dvae = tiny_dvae_workdir(str(tmp_path / "dvae"))
    wrong = run_module(*base, f"--config.clip_workdir={dvae}", "--workdir", str(tmp_path / "b"))
    for proc, says in [
        (missing, "config.clip_workdir is empty"),
        (wrong, "holds a dVAE workdir, not a CLIP"),
    ]:
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert lines[0].startswith("error: ") and says in lines[0], lines
        assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "a" / "config.json")


def test_upsampler_trains_and_blurs_its_input_only_in_training(tmp_path):
    c = tiny_unet(load_config("unclip_upsampler_shapes"))
    c.model.image_size, c.model.low_res_size = 16, 8
    c.model.blur_sigma = (0.5, 0.6)
    c.data.train_crop = 0
    c.total_steps = 2
    workdir = str(tmp_path / "up")
    trainer.train(
        c, workdir, upsampler_task.make_task(c, workdir), devices=jax.devices()[:1], log_fn=lambda s: None
    )
    assert sorted(losses(workdir)) == [1, 2] and all(np.isfinite(list(losses(workdir).values())))

    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    plain = pixels.area_resize(pixels.to_model(image), 8)
    train_fn = upsampler_task.make_example_fn(c, train=True)
    ex = train_fn({"image": image, "caption": "x"}, np.random.default_rng(1))
    np.testing.assert_allclose(ex["target"], pixels.to_model(image), atol=1e-6)
    assert ex["low_res"].shape == (8, 8, 3) and np.abs(ex["low_res"] - plain).max() > 0.05
    # Blurring smooths: neighbouring pixels differ less than in the plain copy.
    assert np.abs(np.diff(ex["low_res"], axis=0)).mean() < np.abs(np.diff(plain, axis=0)).mean()
    ev = upsampler_task.make_example_fn(c, train=False)(
        {"image": image, "caption": "x"}, np.random.default_rng(1)
    )
    np.testing.assert_array_equal(ev["low_res"], plain)
    # Training crops: the target's square and the low-res square over the same area.
    c.data.train_crop = 8
    ex = upsampler_task.make_example_fn(c, train=True)(
        {"image": image, "caption": "x"}, np.random.default_rng(2)
    )
    assert ex["target"].shape == (8, 8, 3) and ex["low_res"].shape == (4, 4, 3)
    windows = [
        (top, left)
        for top in range(0, 9, 2)
        for left in range(0, 9, 2)
        if np.array_equal(ex["target"], pixels.to_model(image)[top : top + 8, left : left + 8])
    ]
    assert len(windows) == 1, windows


def test_api_decodes_and_guidance_at_scale_one_is_unguided(full_run, clip_workdir):
    trained = Decoder.load(full_run)
    z = trained.embed_images(np.zeros((2, 20, 24, 3), np.uint8))
    assert z.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)
    # Four steps leave the zero-initialised output near zero; random weights make every input count.
    abstract = unet.abstract_params(trained.model)
    decoder = Decoder(
        trained.config, jax.tree.map(jnp.asarray, random_params(abstract, 3, 0.2)), trained.clip
    )
    captions = ["a red circle", "a blue square"]
    kw = dict(sampler="ddim", steps=3, eta=0.0, seed=5)
    images = decoder.decode(z, captions, cond_scale=1.0, **kw)
    assert images.dtype == np.uint8 and images.shape == (2, 8, 8, 3)
    # The unguided sampler, built here from the network alone, gives the same bits.
    cond = decoder.condition(z, captions)

    @jax.jit
    def unguided(params, x_T, rng):
        model_fn = lambda x, t: decoder.model.apply(
            {"params": params},
            x,
            t,
            clip_embedding=cond["clip_embedding"],
            text_states=cond["text_states"],
            text_mask=cond["text_mask"],
        )
        return samplers.sample(
            model_fn,
            x_T,
            rng,
            decoder.schedule,
            sampler="ddim",
            steps=3,
            prediction=decoder.prediction,
            clip_x0=(-1.0, 1.0),
        )

    rng = jax.random.fold_in(jax.random.key(5), 1)
    np.testing.assert_array_equal(images, pixels.to_uint8(unguided(decoder.params, decoder.noise(2, 5), rng)))
    guided = decoder.decode(z, captions, cond_scale=3.0, **kw)
    assert guided.shape == images.shape and not np.array_equal(guided, images)
    x_T = decoder.invert(images, z, steps=3, captions=captions)
    assert x_T.shape == (2, 8, 8, 3) and np.isfinite(x_T).all()
    with pytest.raises(ValueError, match="holds a CLIP workdir, not an unCLIP decoder workdir"):
        Decoder.load(clip_workdir)
