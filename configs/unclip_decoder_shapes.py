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
    # The paper decoder's layout at width 16 (Table 3: channel multiple 1,2,3,4; attention where a
    # feature covers 2, 4 and 8 pixels of the input, its 32,16,8 at 64x64): 32 -> 4x4, where every
    # feature touches the border, so the convolutions' padding tells the network where it is. With
    # levels (1, 2, 4) and attention at 8x8 only, 800 steps drew the right colours at random places
    # (docs/results.md, unCLIP decoder on shapes).
    m.model_channels, m.channel_mult, m.num_res_blocks = 16, (1, 2, 3, 4), 1
    m.attention_resolutions, m.head_channels = (16, 8, 4), 16
    m.norm_groups = 8  # two channels per group at the first level
    # clip_dim, text_width, text_length and data.image_size 0: taken from config.clip_workdir.
    # v-prediction (Salimans & Ho 2022): at the same 800 steps eps-prediction still drew noise.
    c.diffusion.prediction = "v"
    # The plain v loss, no min-SNR weights: those (gamma 5, Hang et al. 2023) fall as SNR at low SNR,
    # where an object's place is decided; with them the decoder never learnt to place objects.
    c.diffusion.min_snr_gamma = 0.0
    c.batch_size = 32
    c.total_steps = 600  # 6-10 minutes on 2 cores without bf16 units; longer recipes: docs/unclip.md
    c.log_every = 25
    c.eval_every = c.checkpoint_every = 300
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 50
    # EMA 0.999 with warm-up: the paper's 0.9999 would average over more steps than the run has.
    c.ema_decay, c.ema_warmup = 0.999, True
    return lock(c)
