"""OpenAI CLIP ViT-B-16 (widths, depths and patch from the paper; OpenAI's BPE, context 77).

Training: python -m clip_jax.train --config configs/clip_vit_b16.py --workdir W --config.data.source=...
Released weights: python -m clip_jax.convert --source openai --checkpoint P --model ViT-B-16 --workdir W
"""
from core_jax.config import lock

from clip_jax.defaults import vit_config


def get_config(arg=None):
    c = vit_config("ViT-B-16")
    c.data.source = "webdataset"
    c.data.random_crop = False
    c.batch_size = 32768  # OpenAI's global batch
    c.total_steps = 32 * 400_000_000 // 32768  # 32 epochs of 400M pairs, as in the paper
    c.compute_dtype = "bfloat16"
    c.remat = "dots"
    c.optim.learning_rate = 5e-4
    c.optim.warmup_steps = 2000
    c.optim.weight_decay = 0.2
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 2000
    return lock(c)
