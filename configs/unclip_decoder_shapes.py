"""The unCLIP decoder on the shapes suite: 32x32 images drawn from the CLIP embeddings (and
captions) of a configs/clip_shapes.py CLIP, sized to train on 2 CPU cores in minutes.

python -m dalle_jax.unclip.train_decoder --config configs/unclip_decoder_shapes.py \
    --config.clip_workdir=runs/clip --workdir runs/unclip_decoder
"""

from core_jax.config import lock
from dalle_jax.unclip.decoder_task import decoder_config


def get_config(arg=None):
    c = decoder_config()
    m = c.model
    # Half the shapes' 64x64 scenes: the smallest object (14 px) keeps 7 px, and the 32x32 U-Net
    # costs a quarter of the 64x64 one.
    m.image_size = 32
    m.model_channels, m.channel_mult, m.num_res_blocks = 32, (1, 2, 2), 1
    # Attention where a feature covers 2x2 and 4x4 pixels: the caption and CLIP tokens are read
    # there, and 16x16 positions still place objects left / right of each other.
    m.attention_resolutions, m.head_channels = (16, 8), 32
    m.norm_groups = 16  # two channels per group at the first level
    # clip_dim, text_width, text_length and data.image_size 0: taken from config.clip_workdir.
    # Min-SNR weights (Hang et al. 2023, gamma 5: 3.4x faster convergence) for a short CPU run.
    c.diffusion.min_snr_gamma = 5.0
    c.batch_size = 32
    # A first budget (docs/results.md has the measured step time): about 10 minutes on 2 idle cores.
    c.total_steps = 500
    c.log_every = 25
    c.eval_every = c.checkpoint_every = 500
    c.optim.learning_rate = 5e-4
    c.optim.warmup_steps = 100
    # EMA 0.999 with warm-up: the paper's 0.9999 would average over more steps than the run has.
    c.ema_decay, c.ema_warmup = 0.999, True
    return lock(c)
