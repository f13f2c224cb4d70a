"""Tiny random workdirs written the way converters and trainers write them (config.json + a
params checkpoint), for tests that need a trained-looking model without training one."""

import flax.linen as nn
import jax
import numpy as np


def random_params(abstract, seed, scale):
    """Random values in the params' shapes, filled on the host (a jitted init compiles slowly);
    LayerNorm scales near 1."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        value = scale * rng.standard_normal(leaf.shape).astype(np.float32)
        return value + (1.0 if getattr(path[-1], "key", "") == "scale" else 0.0)

    return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(abstract))


def tiny_dvae_workdir(wd, size: int = 16, codes: int = 32):
    """A random shapes dVAE mapping size x size images to (size/4)^2 tokens of `codes` codes."""
    from core_jax.checkpoint import save_params
    from dalle_jax import dvae_task
    from configs.dvae_shapes import get_config

    c = get_config()
    c.model.vocab_size, c.model.hidden, c.model.width_multipliers = codes, 8, (1, 1, 1)  # /4
    c.model.blocks_per_group, c.model.decoder_init_channels = 1, 8
    c.model.colour_codes = 0  # a plain codebook, so `codes` can be any size
    c.data.image_size = size
    model = dvae_task.model_from_config(c)
    abstract = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, size, size, 3), np.float32))
    save_params(wd, c, random_params(abstract["params"], 1, 0.3))
    return wd


def tiny_clip_workdir(wd, image_size: int = 16):
    """A random shapes CLIP (width 16, one block per tower, 8-dim embeddings) reading
    image_size x image_size images, with the shapes BPE trained into its workdir."""
    from core_jax.checkpoint import save_params
    from core_jax.text import tokenizer_from_config
    from clip_jax import model as clip_model
    from configs.clip_shapes import get_config

    c = get_config()
    c.model.image_size = c.data.image_size = image_size
    c.model.update(
        patch_size=8,
        vision_width=16,
        vision_layers=1,
        vision_heads=2,
        text_width=16,
        text_layers=1,
        text_heads=2,
        embed_dim=8,
        chroma_layer=0,
    )
    c.scan_unroll = 1
    tokenizer_from_config(c.text, wd, data_source="shapes")
    abstract = clip_model.abstract_params(clip_model.clip_from_config(c))
    save_params(wd, c, random_params(abstract, 2, 0.3))
    return wd
