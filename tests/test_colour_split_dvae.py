"""The shapes suite's structure / colour split of the dVAE (dalle_jax/experiments/colour_split_dvae.py):
its product codebook and the split itself (tests/test_dvae_cli.py trains configs/dvae_shapes.py sharded)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_jax.config import ConfigError
from core_jax.data import image_ops, shapes
from dalle_jax import dvae as dvae_lib
from dalle_jax import dvae_models
from dalle_jax.experiments import colour_split_dvae
from tests.test_dvae_model import init, tiny_model_config


def test_code_digits_make_embeddings_sums_over_digits():
    """The product-codebook decoder embedding that model.colour_codes builds on, with three digits:
    a code's row is the sum of one row per digit, for int tokens (the lookup) and one-hot codes
    (the matmul) alike."""
    assert "codebook_factors" not in dvae_lib.default_model_config()  # colour_codes sets the digits
    digits = colour_split_dvae.factor_digits((4, 2, 8))
    assert digits[13].tolist() == [0, 1, 5]  # 13 = (0 * 2 + 1) * 8 + 5 (first digit most significant)
    params = {
        "kernel": np.random.default_rng(0).normal(size=(1, 1, 14, 16)).astype(np.float32),  # 4 + 2 + 8
        "bias": np.zeros(16, np.float32),
    }
    rows = params["kernel"][0, 0]
    table = rows[digits[:, 0]] + rows[4 + digits[:, 1]] + rows[6 + digits[:, 2]]
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 4, 4)))
    embedding = colour_split_dvae.ProductCodeEmbedding(16, 64, code_digits=(4, 2, 8))
    embedded = embedding.apply({"params": params}, tokens)
    np.testing.assert_allclose(embedded, table[np.asarray(tokens)], atol=1e-6)
    np.testing.assert_allclose(
        embedding.apply({"params": params}, jax.nn.one_hot(tokens, 64)), embedded, atol=1e-5
    )


def test_colour_codes_split_structure_from_colour():
    m = tiny_model_config(vocab_size=32, colour_codes=4)  # 8 structure x 4 colour values
    scene = shapes.make_example("test_unseen", 0)
    assert len(scene["objects"]) == 1
    obj = scene["objects"][0]
    # The same object in every colour of the suite, held-out pairs included.
    images = np.stack([shapes.render([dict(obj, colour=c)]) for c in shapes.COLOURS])
    x = jnp.asarray(image_ops.dvae_map_pixels(images))
    model = dvae_models.make_dvae(m)
    params = init(model, x)
    assert params["encoder"]["input"]["kernel"].shape[2] == 1  # the trunk reads the structure view
    assert params["encoder"]["output"]["kernel"].shape[-1] == 8
    assert params["encoder"]["colour"]["output"]["kernel"].shape[-1] == 4
    assert params["decoder"]["input"]["kernel"].shape[2] == 12  # 8 + 4 rows
    logits = np.asarray(model.apply({"params": params}, x, method=dvae_lib.DVAE.encode))
    grid = logits.reshape(6, 8, 8, 8, 4)  # code = structure * 4 + colour
    # Colour value 0 is the dark cells' and only theirs.
    dark = images.reshape(6, 8, 8, 8, 8, 3).max(axis=(2, 4, 5)) < 13
    assert dark.any() and (~dark).any()
    assert (grid[dark][..., 1:] < -1e3).all() and (grid[dark][..., 0] > -1e3).all()
    assert (grid[~dark][..., 0] < -1e3).all() and (grid[~dark][..., 1:] > -1e3).all()
    bright = grid[~dark][..., 1:]  # [cells, structure, colour 1..3]: a code's logit is a sum
    np.testing.assert_allclose(
        bright, bright[..., :, :1] + bright[..., :1, :] - bright[..., :1, :1], atol=1e-4
    )
    # The structure logits do not move when only the colour changes; the colour logits do.
    allowed = np.where(dark, 0, 1)[..., None, None]
    at_allowed = np.take_along_axis(grid, np.broadcast_to(allowed, grid.shape[:-1] + (1,)), -1)[..., 0]
    structure = at_allowed - at_allowed[..., :1]
    np.testing.assert_allclose(structure, np.broadcast_to(structure[:1], structure.shape), atol=1e-4)
    assert np.abs(structure[:, 0, 0] - structure[:, 3, 3]).max() > 1e-4  # not a constant either
    colour = grid[~dark][:, 0, 1:] - grid[~dark][:, 0, 1:2]
    per_image = colour.reshape(6, -1, 3)
    assert np.abs(per_image - per_image[:1]).max() > 1e-3
    assert (
        dvae_models.forward_flops(m, 64)[0]
        != dvae_models.forward_flops(tiny_model_config(vocab_size=32), 64)[0]
    )
    for bad, message in [
        (dict(colour_codes=3), "divide vocab_size=32"),
        (dict(colour_codes=32), "divide vocab_size=32"),
        (dict(colour_codes=4, input_channels=1), "RGB inputs"),
    ]:
        with pytest.raises(ConfigError, match=message):
            dvae_models.make_dvae(tiny_model_config(vocab_size=32, **bad))
    # A workdir trained with the free product codebook this model no longer builds (its config.json
    # holds the key) is refused by name.
    old = tiny_model_config(vocab_size=32, codebook_factors=(4, 8))
    with pytest.raises(ConfigError, match=r"model.codebook_factors=\(4, 8\).*no longer builds"):
        dvae_models.make_dvae(old)
    # OpenAI's module alone cannot build the experiment (it cannot import what builds on it).
    with pytest.raises(ConfigError, match="dalle_jax.dvae_models.make_dvae"):
        dvae_lib.make_dvae(m)
