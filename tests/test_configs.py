"""Every shipped config loads and validates; the paper-scale ones build (abstractly) with the
published sizes and shard as intended on pod-sized meshes, checked on AbstractMeshes (no devices).
"""

import glob
import math
import os

import flax.linen as nn
import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from core_jax import aot, sharding, trainer
from core_jax.app import load_config
from core_jax.config import validate
from tests.toy_task import make_toy_task, toy_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))

# name: (devices of the slice the config is meant for, total parameters). The CLIP counts are
# OpenAI's released models, logit scale included; the dVAE's are OpenAI's encoder (53.8M) and
# decoder (43.8M); the DALL-E's is this implementation of the paper's 12B (64 layers of width 3968);
# the unCLIP ones are this implementation's decoder and 64 -> 256 upsampler (unCLIP Table 3: 3.5B
# with GLIDE's 1.2B text encoder, which ours reads from CLIP instead, and 700M).
PAPER = {
    "dalle_paper": (128, 12_293_857_024),
    "clip_vit_b32": (64, 151_277_313),
    "clip_vit_b16": (64, 149_620_737),
    "clip_vit_l14": (64, 427_616_513),
    "dvae_openai": (64, 97_616_006),
    "unclip_decoder_paper": (128, 2_250_745_859),
    "unclip_upsampler_paper": (64, 729_702_083),
}


def pod_mesh(config, devices):
    return AbstractMesh(sharding.mesh_shape(config.mesh, devices), sharding.MESH_AXES)


def abstract_params(config):
    """Boxed abstract params through the path training and `core_jax.aot` take."""
    task = aot.load_task_module(config).make_task(config, None)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in task.batch_spec(int(config.batch_size)).items()
    }
    return trainer.abstract_boxed_params(task, config, batch)


def test_the_list_covers_the_paper_configs():
    assert set(PAPER) <= set(CONFIGS) and len(CONFIGS) >= 9, CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_validates(name):
    config = load_config(name)
    assert config.task and config.total_steps > 0
    validate(config, PAPER.get(name, (1,))[0])


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_sizes_and_pod_sharding(name):
    devices, expected = PAPER[name]
    config = load_config(name)
    boxed = abstract_params(config)
    assert trainer.count_params(nn.meta.unbox(boxed)) == expected
    # On the slice it is meant for, no weight of consequence is left replicated by a mesh size
    # that does not divide it (the dVAE's 3-channel input conv is, below the warning's threshold).
    mesh = pod_mesh(config, devices)
    assert sharding.undivided_warning(mesh, boxed) is None
    lost = sharding.undivided_weights(mesh, boxed)
    assert sum(math.prod(shape) for _, shape, _ in lost) < sharding.UNDIVIDED_WARN_FRACTION * expected


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_decode_in_worker_threads(name):
    # The calling thread alone decodes ~200 JPEGs/s (docs/data.md); a pod host needs far more.
    assert load_config(name).data.num_workers >= 8


def test_dalle_paper_golden_specs():
    config = load_config("dalle_paper")
    boxed = abstract_params(config)
    block = boxed["layers"]["scan"]["block"]
    fits, too_wide = pod_mesh(config, 128), pod_mesh(config, 256)
    query, mlp_in = block["attn"]["query_kernel"], block["mlp"]["in_kernel"]
    assert query.value.shape == (64, 3968, 62, 64) and mlp_in.value.shape == (64, 3968, 15872)
    assert sharding.spec_for(query.names, query.value.shape, fits) == P(None, "fsdp")
    assert sharding.spec_for(mlp_in.names, mlp_in.value.shape, fits) == P(None, "fsdp")
    # 3968 = 2^7 x 31: fsdp 256 cannot split the model width, so the 12B weights would be
    # replicated on every chip; the warning says so before anything compiles.
    assert sharding.spec_for(query.names, query.value.shape, too_wide) == P()
    assert sharding.undivided_axes(query.names, query.value.shape, too_wide) == {"fsdp": ("embed", 3968)}
    warning = sharding.undivided_warning(too_wide, boxed)
    assert warning and "fsdp=256 on embed=3968" in warning and "(100.0%," in warning
    assert "layers/scan/block/mlp/in_kernel (64, 3968, 15872)" in warning


def test_undivided_axes_ignores_axes_used_elsewhere_and_size_one():
    mesh = AbstractMesh((1, 4, 2), sharding.MESH_AXES)
    # tensor 2 divides mlp 6; fsdp 4 does not divide embed 6
    assert sharding.undivided_axes(("embed", "mlp"), (6, 6), mesh) == {"fsdp": ("embed", 6)}
    assert sharding.undivided_axes(("embed", "mlp"), (8, 6), mesh) == {}
    # a conv kernel: conv_in and embed-like axes both want fsdp; one that divides is enough
    assert sharding.undivided_axes((None, None, "conv_in", "conv_out"), (3, 3, 3, 8), mesh) == {
        "fsdp": ("conv_in", 3)
    }
    one = AbstractMesh((8, 1, 1), sharding.MESH_AXES)  # params are not split over data
    assert sharding.undivided_axes(("embed", "vocab"), (7, 5), one) == {}


def test_trainer_warns_at_startup(tmp_path):
    """Width 36 on fsdp 8: the toy model's wide weights lose their fsdp split, and the run says so."""
    config = toy_config(**{"mesh.data": 1, "mesh.fsdp": 8, "total_steps": 1, "checkpoint_every": 1})
    logged = []
    trainer.train(config, str(tmp_path / "w36"), make_toy_task(config, width=36), log_fn=logged.append)
    warnings = [l for l in logged if l.startswith("warning:") and "replicated" in l]
    assert len(warnings) == 1 and "fsdp=8 on embed=36" in warnings[0], logged
    assert "w_in (768, 36)" in warnings[0]
    logged.clear()
    trainer.train(config, str(tmp_path / "w32"), make_toy_task(config), log_fn=logged.append)
    assert not [l for l in logged if "replicated" in l], logged


def test_dvae_openai_follows_the_paper_recipe():
    """Ramesh et al. 2021, appendix A.2 and Listing 1."""
    from core_jax.optim import make_schedule

    c = load_config("dvae_openai")
    lr = make_schedule(c.optim, c.total_steps)
    assert float(lr(0)) == pytest.approx(1e-4, rel=1e-6)
    assert float(lr(600_000)) == pytest.approx((1e-4 + 1.25e-6) / 2, rel=1e-5)  # cosine midpoint
    for step in (1_200_000, 2_000_000, 3_000_000):
        assert float(lr(step)) == pytest.approx(1.25e-6, rel=1e-5), step
    assert (c.total_steps, c.batch_size, c.data.image_size) == (3_000_000, 512, 256)
    assert (c.optim.name, c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay) == (
        "adamw",
        0.9,
        0.999,
        1e-8,
        1e-4,
    )
    assert c.ema_decay == 0.999
    assert c.data.random_crop and c.data.random_flip
    assert tuple(c.data.random_resize_range) == (9 / 8, 12 / 8)
    m = c.model
    assert (m.kl_weight_start, m.kl_weight_end, m.kl_weight_ramp_steps, m.kl_weight_schedule) == (
        0.0,
        6.6,
        5000,
        "cosine",
    )
    assert (m.temperature_start, m.temperature_end, m.temperature_anneal_steps, m.temperature_schedule) == (
        1.0,
        1 / 16,
        150_000,
        "cosine",
    )


@pytest.mark.parametrize("name", ["clip_vit_b32", "clip_vit_b16", "clip_vit_l14"])
def test_clip_paper_configs_random_square_crop_only(name):
    """Radford et al. 2021, section 2.5: "A random square crop from resized images is the only data
    augmentation used during training". Eval keeps the centre crop."""
    import numpy as np
    from clip_jax.task import make_example_fns

    config = load_config(name)
    assert config.data.random_crop and not config.data.random_flip

    class Tokenizer:
        def encode(self, texts):
            return np.zeros((len(texts), 77), np.int32)

    train_fn, eval_fn = make_example_fns(config, Tokenizer())
    size = int(config.model.image_size)
    # A 2:1 image whose columns are numbered: the crop's offset is its first column's value.
    wide = np.broadcast_to(np.arange(2 * size, dtype=np.uint8)[None, :, None], (size, 2 * size, 3))
    raw = {"image": np.ascontiguousarray(wide), "caption": "a cat"}
    mean, std = 0.48145466 * 255, 0.26862954 * 255  # undo CLIP's red-channel normalisation

    def offset(example):
        assert example["image"].shape == (size, size, 3)
        return round(float(example["image"][0, 0, 0]) * std + mean)

    offsets = {offset(train_fn(raw, np.random.default_rng(i))) for i in range(8)}
    assert len(offsets) > 4 and offsets <= set(range(size + 1))
    assert offset(eval_fn(raw, np.random.default_rng(0))) == size // 2


def test_dalle_paper_never_trains_its_tokenizer_on_shapes_captions(tmp_path):
    from core_jax.config import ConfigError

    config = load_config("dalle_paper")
    assert config.data.source != "shapes" and config.text.merges_file == ""
    task_module = aot.load_task_module(config)
    with pytest.raises(ConfigError, match="text.merges_file .*text.train_source") as e:
        task_module.make_task(config, str(tmp_path / "wd"))
    assert len(str(e.value).splitlines()) == 1
    assert not (tmp_path / "wd" / "tokenizer").exists()
