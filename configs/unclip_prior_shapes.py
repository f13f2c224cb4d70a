"""The unCLIP diffusion prior on the shapes suite: captions -> CLIP image embeddings of a
configs/clip_shapes.py CLIP, sized to train on 2 CPU cores in about 5 minutes.

python -m dalle_jax.unclip.train_prior --config configs/unclip_prior_shapes.py \
    --config.clip_workdir=runs/clip --workdir runs/unclip_prior
"""

from core_jax.config import lock
from dalle_jax.unclip.prior_task import prior_config


def get_config(arg=None):
    c = prior_config()
    m = c.model
    # Width 128 (the shapes CLIP's embedding width) and 4 blocks: the step is compute-bound, and a
    # quarter of width 256's FLOPs keeps a useful prior within minutes on 2 cores.
    m.width, m.num_layers, m.num_heads = 128, 4, 4
    # clip_dim, text_width, text_length and data.image_size 0: taken from config.clip_workdir.
    # Batch 128: enough captions per step for a smooth x0 loss at every noise level, small enough
    # for ~2 steps a second on 2 cores.
    c.batch_size = 128
    # 1000 steps = 128K examples, ~6 passes over 20K pre-computed embeddings (docs/unclip.md).
    c.total_steps = 1000
    c.log_every = 50
    c.eval_every = c.checkpoint_every = 500
    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 100
    # EMA 0.999 with warm-up: the paper's 0.9999 would average over more steps than the run has.
    c.ema_decay, c.ema_warmup = 0.999, True
    c.sample.steps = 32  # half the paper's 64 (Table 3): a cheaper sample evaluation on CPU
    return lock(c)
