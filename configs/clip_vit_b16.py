"""OpenAI CLIP ViT-B-16 (widths, depths and patch from the paper; OpenAI's BPE, context 77).

Training: python -m clip_jax.train --config configs/clip_vit_b16.py --workdir W --config.data.source=...
Released weights: python -m clip_jax.convert --source openai --checkpoint P --model ViT-B-16 --workdir W
"""

from core_jax.config import lock

from clip_jax.defaults import paper_config


def get_config(arg=None):
    # The paper's recipe (clip_jax.defaults.paper_config); override any key with --config.KEY=...
    return lock(paper_config("ViT-B-16"))
