"""An unCLIP upsampler on the shapes suite: 32x32 -> 64x64, a convolutional U-Net (no attention)
sized to train on 2 CPU cores in minutes.

python -m dalle_jax.unclip.train_upsampler --config configs/unclip_upsampler_shapes.py --workdir runs/unclip_upsampler
"""

from core_jax.config import lock
from dalle_jax.unclip.upsampler_task import upsampler_config


def get_config(arg=None):
    c = upsampler_config()
    m = c.model
    m.image_size, m.low_res_size = 64, 32
    # Width 16: 600 steps in about 8 minutes on 2 cores (docs/results.md, unCLIP upsampler on shapes).
    m.model_channels, m.channel_mult, m.num_res_blocks = 16, (1, 2, 2), 1
    m.norm_groups = 8  # two channels per group at the first level
    # Blur std from none to the paper's 0.6 (appendix C), per example: the decoder's samples are
    # softer than the data, and the upsampler should sharpen both.
    m.blur_sigma = (0.0, 0.6)
    # Half-size crops (the paper: a quarter, Table 3): a 16x16 low-res crop still holds a whole
    # shape at 32x32, and each example costs a quarter of the full image.
    c.data.train_crop = 32
    c.diffusion.prediction = "v"  # as the shapes decoder (Salimans & Ho 2022)
    c.diffusion.min_snr_gamma = 5.0  # Hang et al. 2023 (gamma 5): faster convergence on a short run
    c.batch_size = 32
    c.total_steps = 600
    c.log_every = 25
    c.eval_every = c.checkpoint_every = 600
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 50
    c.ema_decay, c.ema_warmup = 0.999, True  # 0.9999 (the paper's) would outlast the run
    return lock(c)
