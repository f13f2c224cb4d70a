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
    # Width 16 at 32x32, 64 at 8x8: a quarter of the FLOPs of width 32 with levels (1, 2, 2), and in
    # 800 steps it draws the colours and rough shapes (docs/results.md, unCLIP decoder on shapes).
    m.model_channels, m.channel_mult, m.num_res_blocks = 16, (1, 2, 4), 1
    # Attention (and the CLIP and caption tokens) where a feature covers 4x4 pixels.
    m.attention_resolutions, m.head_channels = (8,), 32
    m.norm_groups = 8  # two channels per group at the first level
    # clip_dim, text_width, text_length and data.image_size 0: taken from config.clip_workdir.
    # v-prediction (Salimans & Ho 2022): at the same 800 steps eps-prediction still drew noise.
    c.diffusion.prediction = "v"
    # Min-SNR weights (Hang et al. 2023, gamma 5: 3.4x faster convergence) for a short CPU run.
    c.diffusion.min_snr_gamma = 5.0
    c.batch_size = 32
    c.total_steps = 800  # about 10 minutes on 2 cores without bf16 units (docs/results.md)
    c.log_every = 25
    c.eval_every = c.checkpoint_every = 400
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 50
    # EMA 0.999 with warm-up: the paper's 0.9999 would average over more steps than the run has.
    c.ema_decay, c.ema_warmup = 0.999, True
    return lock(c)
