"""The unCLIP upsamplers of Ramesh et al. 2022 (arXiv 2204.06125, appendix C, Table 3): ADMNets
without attention or caption, conditioned on a blurred low-resolution copy and trained on random
crops a quarter of the target's side.

--config configs/unclip_upsampler_paper.py           64 -> 256 (700M in the paper)
--config configs/unclip_upsampler_paper.py:256_1024  256 -> 1024 (300M in the paper)

The paper corrupts the second stage's input with BSR degradation (Zhang et al. 2021), which is not
implemented: both stages blur (kernel 3, sigma 0.6, the first stage's). Point `data` at your files:

python -m dalle_jax.unclip.train_upsampler --config configs/unclip_upsampler_paper.py \
    --config.data.urls='/data/{00000..09999}.tar' --workdir UW
"""

from core_jax.config import ConfigError, lock
from core_jax.data.config import POD_HOST_WORKERS
from dalle_jax.unclip.diffusion_task import apply_preset
from dalle_jax.unclip.upsampler_task import upsampler_config

# Table 3, per stage: (preset, low-res size, noise schedule, DDIM steps, batch, learning rate).
# Both: 1M iterations, Adam b2 0.999, eps 1e-8, EMA 0.9999, crop fraction 0.25.
STAGES = {
    "64_256": ("upsampler_64_256_paper", 64, "cosine", 27, 1024, 1.2e-4),
    "256_1024": ("upsampler_256_1024_paper", 256, "linear", 15, 512, 1.0e-4),
}


def get_config(arg=None):
    stage = arg or "64_256"
    if stage not in STAGES:
        raise ConfigError(
            f"unclip_upsampler_paper: unknown stage {stage!r}; choose one of {', '.join(STAGES)}"
        )
    preset, low_res, schedule, steps, batch, lr = STAGES[stage]
    c = upsampler_config()
    apply_preset(c.model, preset)  # channels, depth, channel mult, dropout of Table 3
    c.model.low_res_size = low_res
    c.model.blur_sigma, c.model.blur_kernel = (0.6, 0.6), 3  # appendix C: kernel size 3, sigma 0.6
    c.model.eval_max_batches = 10
    c.data.train_crop = c.model.image_size // 4  # Table 3: crop fraction 0.25
    c.diffusion.schedule = schedule
    c.sample.steps = steps
    c.batch_size = batch
    c.total_steps = 1_000_000
    c.optim.learning_rate = lr
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8  # appendix C: b1 0.9; Table 3: b2, eps
    # No weight decay in Table 3 for the upsamplers, no schedule or warm-up named: the rate is
    # held after a 1000-step warm-up.
    c.optim.weight_decay = 0.0
    c.optim.schedule, c.optim.warmup_steps = "constant", 1000
    c.ema_decay = 0.9999
    c.compute_dtype = "bfloat16"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.data.source = "webdataset"
    c.data.eval_split = "validation"
    c.data.num_workers = POD_HOST_WORKERS  # JPEG decoding in worker threads
    c.log_every = 100
    c.checkpoint_every = 2000
    c.eval_every = 10000
    return lock(c)
