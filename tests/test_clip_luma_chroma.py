"""The luma_chroma patch stem (clip_jax/experiments/luma_chroma.py), built through
clip_jax.clip_models: what it sees, how configs select and check it, that its params tree is the
paper's with its own stem, and that a workdir written with it loads to the same embeddings."""

import flax
import flax.linen as nn
import jax
import numpy as np
import pytest

from clip_jax import clip_models, model
from clip_jax.experiments import luma_chroma
from core_jax.errors import ConfigError
from tests.test_clip_model import IMAGE, encode_image, make_params, tiny_config


@pytest.mark.parametrize("patch_embed,chroma_layer", [("rgb", 0), ("luma_chroma", 0), ("luma_chroma", 1)])
def test_luma_chroma_stem_sees_colour_only_per_patch(patch_embed, chroma_layer):
    """Swapping two pixels of one patch whose colours differ but whose luminance is equal keeps the
    patch's luminance pattern and mean colour: invisible to luma_chroma, visible to rgb."""
    config = tiny_config(patch_embed=patch_embed, chroma_layer=chroma_layer)
    clip, params = clip_models.clip_from_config(config), make_params(config)
    rng = np.random.default_rng(3)
    a = rng.normal(size=(1, IMAGE, IMAGE, 3)).astype(np.float32)
    # Luminance is taken of the un-normalised pixels: d changes the colour, not the luminance.
    w = np.asarray(luma_chroma.LUMA, np.float32) * np.asarray(luma_chroma.CLIP_STD, np.float32)
    d = np.cross(w, rng.normal(size=3)).astype(np.float32)
    u = a[0, 1, 1].copy()
    a[0, 1, 1], a[0, 2, 5] = u + d, u - d  # one 8x8 patch, equal luminance, different colours
    b = a.copy()
    b[0, 1, 1], b[0, 2, 5] = a[0, 2, 5], a[0, 1, 1]
    fa, fb = encode_image(clip, params, a), encode_image(clip, params, b)
    if patch_embed == "luma_chroma":
        np.testing.assert_allclose(fa, fb, atol=1e-5)
        assert "luma_kernel" in params["visual"] and "patch_kernel" not in params["visual"]
        assert ("transformer_late" in params["visual"]) == (chroma_layer > 0)
        # Without the colour term, one outline drawn in two colours on black is one input.
        from core_jax.data import image_ops
        from core_jax.data.shapes import render

        images = np.stack(
            [
                image_ops.clip_normalize(
                    render([{"colour": colour, "shape": "triangle", "bbox": (2, 3, 12, 13), "size": 10}])
                )[:IMAGE, :IMAGE]
                for colour in ("red", "green")
            ]
        )
        colour_blind = dict(params, visual=dict(params["visual"]))
        colour_blind["visual"]["chroma_kernel"] = np.zeros_like(params["visual"]["chroma_kernel"])
        red, green = encode_image(clip, colour_blind, images)
        np.testing.assert_allclose(red, green, atol=0.02)
        full = encode_image(clip, params, images)  # with the colour term they differ
        assert np.abs(full[0] - full[1]).max() > 1e-4
    else:
        assert np.abs(fa - fb).max() > 1e-3


def test_patch_embed_selects_the_model_and_is_checked():
    config = tiny_config()
    assert type(clip_models.clip_from_config(config)) is model.CLIP
    del config.model["patch_embed"], config.model["chroma_layer"]  # workdirs written before the keys
    assert type(clip_models.clip_from_config(config)) is model.CLIP
    config.model.patch_embed = "hsv"
    with pytest.raises(ConfigError, match="patch_embed"):
        clip_models.clip_from_config(config)
    config.model.patch_embed = "rgb"
    config.model.chroma_layer = 1  # colour is added late only to the luma_chroma stem
    with pytest.raises(ConfigError, match="chroma_layer"):
        clip_models.clip_from_config(config)
    config.model.patch_embed = "luma_chroma"
    clip = clip_models.clip_from_config(config)
    assert type(clip) is luma_chroma.LumaChromaCLIP and clip.chroma_layer == 1
    config.model.chroma_layer = 2  # == vision_layers: no block left to see the colour
    with pytest.raises(ConfigError, match="chroma_layer"):
        clip_models.clip_from_config(config)
    # The paper's builder, which the weight converter checks its trees against, refuses the
    # experiment in one line rather than building something else.
    from clip_jax import convert

    config.model.chroma_layer = 1
    with pytest.raises(ConfigError, match="clip_jax.clip_models"):
        model.clip_from_config(config)
    with pytest.raises(ConfigError, match="experiment"):
        convert.check_against_model({}, config)


def _tree(config):
    """path -> (shape, logical names) of the params `config` builds."""
    boxed = model.abstract_params(clip_models.clip_from_config(config))
    flat = flax.traverse_util.flatten_dict(boxed, is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
    return {"/".join(k): (v.value.shape, tuple(v.names)) for k, v in flat.items()}


@pytest.mark.parametrize("chroma_layer", [0, 1])
def test_luma_chroma_tree_is_the_paper_tree_with_its_stem(chroma_layer):
    """The layout the workdirs trained with luma_chroma hold: the paper's tree with `patch_kernel`
    replaced by the luma / chroma kernels, and with chroma_layer = k the vision blocks split k /
    vision_layers - k between `transformer` and `transformer_late`."""
    paper = _tree(tiny_config())
    stem = _tree(tiny_config(patch_embed="luma_chroma", chroma_layer=chroma_layer))
    p, width = 8, 32
    assert paper.pop("visual/patch_kernel") == ((p * p * 3, width), ("patch", "embed"))
    assert stem.pop("visual/luma_kernel") == ((p * p, width), ("patch", "embed"))
    assert stem.pop("visual/chroma_kernel") == ((3, width), (None, "embed"))
    if chroma_layer:
        layers = {"visual/transformer/": 1, "visual/transformer_late/": 1}  # of the paper's 2
        for prefix, count in layers.items():
            split = {k for k in stem if k.startswith(prefix)}
            assert len(split) == len([k for k in paper if k.startswith("visual/transformer/")]) > 0
            for k in split:
                shape, names = paper["visual/transformer/" + k[len(prefix) :]]
                assert stem.pop(k) == ((count,) + shape[1:], names), k
        paper = {k: v for k, v in paper.items() if not k.startswith("visual/transformer/")}
    assert stem == paper


def test_luma_chroma_workdir_loads_to_the_same_embeddings(tmp_path):
    """A workdir whose config.json holds patch_embed='luma_chroma' and chroma_layer restores into the
    experiment's model, through the API and through the evaluators' loader, with the saved params
    and the embeddings they give."""
    from clip_jax import eval_common
    from clip_jax.api import CLIPModel
    from core_jax.checkpoint import save_params
    from core_jax.text import train_bpe

    config = tiny_config(patch_embed="luma_chroma", chroma_layer=1)
    texts = ["a red circle", "a blue square", "a green triangle"]
    config.text.merges_file = train_bpe(texts * 3, 300, str(tmp_path / "merges.txt"))
    params = make_params(config, seed=2)
    workdir = str(tmp_path / "w")
    save_params(workdir, config, params)

    clip = CLIPModel.load(workdir)
    assert type(clip.module) is luma_chroma.LumaChromaCLIP and clip.module.chroma_layer == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(clip.params), params)
    images = np.random.default_rng(9).integers(0, 256, size=(4, IMAGE, IMAGE, 3), dtype=np.uint8)
    expected = encode_image(clip.module, params, clip.preprocess_images(images))
    np.testing.assert_allclose(clip.embed_images(images), expected, atol=1e-6)

    mesh = eval_common.data_parallel_mesh()
    restored = eval_common.load_clip_params(workdir, clip.config, None, mesh)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), params)
    encoder = eval_common.ParamsEncoder(clip.config, restored, workdir)
    np.testing.assert_allclose(
        np.asarray(encoder.embed_images(np.tile(images, (2, 1, 1, 1)))[:4]), expected, atol=2e-5
    )
