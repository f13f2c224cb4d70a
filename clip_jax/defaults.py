"""CLIP config building blocks shared by configs/clip_*.py and the weight converter."""

from __future__ import annotations

import math

import ml_collections

from clip_jax.eval_common import eval_config
from core_jax.config import base_config
from core_jax.data.config import POD_HOST_WORKERS

# OpenAI's released ViT sizes (reference-facts.md); heads are width / 64 in both towers.
VIT_SIZES = {
    "ViT-B-32": dict(
        image_size=224,
        patch_size=32,
        vision_width=768,
        vision_layers=12,
        embed_dim=512,
        text_width=512,
        text_layers=12,
    ),
    "ViT-B-16": dict(
        image_size=224,
        patch_size=16,
        vision_width=768,
        vision_layers=12,
        embed_dim=512,
        text_width=512,
        text_layers=12,
    ),
    "ViT-L-14": dict(
        image_size=224,
        patch_size=14,
        vision_width=1024,
        vision_layers=24,
        embed_dim=768,
        text_width=768,
        text_layers=12,
    ),
}
CLIP_VOCAB_SIZE = 49408
CLIP_CONTEXT_LENGTH = 77


def model_config(**sizes) -> ml_collections.ConfigDict:
    """`config.model` with OpenAI's defaults for everything not given."""
    m = dict(
        name="custom",
        image_size=224,
        patch_size=32,
        vision_width=768,
        vision_layers=12,
        vision_heads=None,
        text_width=512,
        text_layers=12,
        text_heads=None,
        embed_dim=512,
        mlp_ratio=4.0,
        activation="quick_gelu",  # quick_gelu (OpenAI) | gelu (exact erf GELU, open_clip)
        ln_eps=1e-5,
        # rgb (OpenAI's patch conv) | luma_chroma (an experiment: clip_jax/experiments; no converter)
        patch_embed="rgb",
        chroma_layer=0,  # luma_chroma: the vision block before which patch colours are added
        posemb="learn",  # learn (OpenAI's table) | sincos2d (fixed 2-D sine-cosine; no converter)
        loss="softmax",  # softmax | sigmoid | sigmoid_chunked
        logit_scale_init=math.log(1 / 0.07),
        sigmoid_scale_init=math.log(10.0),  # SigLIP's t' = log 10 and b = -10
        sigmoid_bias_init=-10.0,
    )
    m.update(sizes)
    m["vision_heads"] = m["vision_heads"] or m["vision_width"] // 64
    m["text_heads"] = m["text_heads"] or m["text_width"] // 64
    return ml_collections.ConfigDict(m)


def text_config(
    merges_file: str = "open_clip",
    vocab_size: int = CLIP_VOCAB_SIZE,
    context_length: int = CLIP_CONTEXT_LENGTH,
) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            merges_file=merges_file,  # '' trains a BPE into the workdir; 'open_clip' = OpenAI's file
            vocab_size=vocab_size,  # embedding rows; must be >= the tokenizer's vocabulary
            context_length=context_length,
            pad_mode="zeros",
            # captions for a trained BPE: 'shapes', a one-caption-per-line file, or '' = 'shapes' when
            # data.source is 'shapes' (any other source must name its captions or a merges file)
            train_source="",
            bpe_dropout=0.0,  # BPE dropout on training captions only; 0 = off
        )
    )


def clip_config(
    model: ml_collections.ConfigDict, text: ml_collections.ConfigDict, evaluators: str = ""
) -> ml_collections.ConfigDict:
    """base_config() + CLIP's sections (unlocked; config files lock it)."""
    c = base_config()
    c.task = "clip_jax.task"
    c.model = model
    c.text = text
    c.eval = eval_config(evaluators)
    c.data.image_size = model.image_size
    c.optim.weight_decay = 0.1
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    return c


def vit_config(name: str, **overrides) -> ml_collections.ConfigDict:
    """Config for one of OpenAI's ViT sizes (`ViT-B-32`, `ViT-B-16`, `ViT-L-14`)."""
    if name not in VIT_SIZES:
        raise ValueError(f"unknown CLIP model {name!r}; known: {sorted(VIT_SIZES)}")
    model = model_config(name=name, **VIT_SIZES[name], **overrides)
    c = clip_config(model, text_config())
    c.eval.zeroshot_source = "tfds"  # ImageNet by default (zeroshot_name), shipped class names
    c.eval.zeroshot_split = "validation"
    return c


# The CLIP paper's recipe (Radford et al. 2021, appendix F, tables 19-20): batch 32768, 32 epochs
# of 400M pairs, AdamW b2 0.98 / eps 1e-6 (clip_config), weight decay 0.2, 2000 warmup steps,
# cosine schedule; lr 5e-4 for the ViT-B models, 4e-4 for ViT-L.
PAPER_LEARNING_RATES = {"ViT-B-32": 5e-4, "ViT-B-16": 5e-4, "ViT-L-14": 4e-4}


def paper_config(name: str) -> ml_collections.ConfigDict:
    """`vit_config(name)` trained as in the paper, on webdataset shards (configs/clip_vit_*.py)."""
    c = vit_config(name)
    c.data.source = "webdataset"
    # "A random square crop from resized images is the only data augmentation used during
    # training" (Radford et al. 2021, section 2.5): the shorter side resized to the model's size,
    # then a square crop at a random offset (image_ops.resize_and_crop); no flips.
    c.data.random_crop = True
    c.data.random_flip = False
    c.data.num_workers = POD_HOST_WORKERS  # JPEG decoding in worker threads
    c.batch_size = 32768
    c.total_steps = 32 * 400_000_000 // 32768
    c.compute_dtype = "bfloat16"
    c.remat = "dots"
    c.optim.learning_rate = PAPER_LEARNING_RATES[name]
    c.optim.warmup_steps = 2000
    c.optim.weight_decay = 0.2
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 2000
    return c
