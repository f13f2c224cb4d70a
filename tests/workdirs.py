"""Tiny random workdirs written the way converters and trainers write them (config.json + a
params checkpoint), for tests that need a trained-looking model without training one."""

import flax.linen as nn
import jax
import numpy as np


# One layer of width 16 in each tower: the smallest CLIP the tests train or load.
TINY_CLIP_TOWERS = dict(
    vision_width=16, vision_layers=1, vision_heads=2, text_width=16, text_layers=1, text_heads=2, embed_dim=8
)


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
    c.model.update(patch_size=8, **TINY_CLIP_TOWERS)
    c.scan_unroll = 1
    tokenizer_from_config(c.text, wd, data_source="shapes")
    abstract = clip_model.abstract_params(clip_model.clip_from_config(c))
    save_params(wd, c, random_params(abstract, 2, 0.3))
    return wd


def tiny_unclip_decoder_workdir(wd, clip_workdir, image_size: int = 8, seed: int = 3):
    """A random unCLIP decoder (one U-Net level of width 8, attention at `image_size`) drawing
    image_size x image_size images from the embeddings of the CLIP in `clip_workdir`."""
    from core_jax.checkpoint import save_params
    from configs.unclip_decoder_shapes import get_config
    from dalle_jax.unclip import decoder_task, unet
    from dalle_jax.unclip.diffusion_task import network

    c = get_config()
    c.model.update(
        image_size=image_size,
        model_channels=8,
        channel_mult=(1,),
        num_res_blocks=1,
        attention_resolutions=(image_size,),
        head_channels=8,
        norm_groups=4,
    )
    c.clip_workdir = clip_workdir
    decoder_task.resolve_clip_sizes(c, decoder_task.load_clip(c))
    model = network(c, **decoder_task.conditioning_sizes(c))
    save_params(wd, c, random_params(unet.abstract_params(model), seed, 0.2))
    return wd


def tiny_unclip_upsampler_workdir(wd, low_res_size: int = 8, factor: int = 2, seed: int = 4):
    """A random unCLIP upsampler (one level of width 8) from low_res_size to factor x that."""
    from core_jax.checkpoint import save_params
    from dalle_jax.unclip import unet
    from dalle_jax.unclip.diffusion_task import unet_spec
    from configs.unclip_upsampler_shapes import get_config

    c = get_config()
    c.model.update(
        image_size=low_res_size * factor,
        low_res_size=low_res_size,
        model_channels=8,
        channel_mult=(1,),
        num_res_blocks=1,
        norm_groups=4,
    )
    model = unet.UNet(unet_spec(c, low_res_channels=3))
    save_params(wd, c, random_params(unet.abstract_params(model), seed, 0.2))
    return wd


def tiny_unclip_prior_workdir(wd, clip_workdir, seed: int = 5):
    """A random unCLIP prior (width 16, one block) drawing embeddings of the CLIP in `clip_workdir`,
    with the embedding statistics of unit vectors spread evenly (mean 0, std 1/sqrt(E))."""
    from core_jax.checkpoint import save_params
    from configs.unclip_prior_shapes import get_config
    from dalle_jax.unclip import embedding_stats, prior, prior_task

    c = get_config()
    c.model.update(width=16, num_layers=1, num_heads=2)
    c.clip_workdir = clip_workdir
    prior_task.resolve_clip_sizes(c, prior_task.load_clip(c))
    model = prior.PriorTransformer(prior_task.prior_spec(c))
    save_params(wd, c, random_params(prior.abstract_params(model), seed, 0.3))
    dim = int(c.model.clip_dim)
    mean, std = np.zeros(dim, np.float32), np.full(dim, dim**-0.5, np.float32)
    stats = dict(image_mean=mean, image_std=std, text_mean=mean, text_std=std, count=np.int64(2))
    embedding_stats.save_stats(wd, dict(stats, clip_workdir=clip_workdir, clip_step=int(c.clip_step)))
    return wd


def tiny_dalle_workdir(
    wd, dvae_workdir, *, grid: int = 4, codes: int = 32, image_size: int = 16, pattern: str = "full"
):
    """A random DALL-E (width 16, 2 heads, one layer per attention kind in `pattern`) over the
    grid x grid tokens of the dVAE in `dvae_workdir` (made with tiny_dvae_workdir(image_size,
    codes)), written as the trainer writes it: the BPE trained into the workdir, the dVAE checked."""
    from core_jax.checkpoint import save_params
    from configs.dalle_shapes import get_config
    from dalle_jax.run_config import resolve_run
    from dalle_jax.transformer import init_params

    c = get_config()
    m = c.model
    m.image_grid, m.image_vocab_size, m.attention_pattern = grid, codes, pattern
    m.d_model, m.num_heads, m.head_dim, m.num_layers, m.mlp_dim = 16, 2, 8, len(pattern.split(",")), 32
    c.data.image_size = image_size
    c.dvae_workdir = dvae_workdir
    run = resolve_run(c, wd)
    abstract = jax.eval_shape(lambda: init_params(run.cfg, jax.random.key(0)))
    save_params(wd, run.config, random_params(abstract, 2, 0.5))
    return wd
