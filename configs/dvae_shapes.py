"""A small dVAE on the built-in shapes suite: 64x64 -> 8x8 tokens, 224 codes, sized for CPU.

The evaluator reports PSNR and codebook usage on `test_unseen` (held-out colour-shape pairs).
Target: PSNR >= 30 dB with >= 90% of the codebook used, reached after configs/dvae_shapes_decoder.py.
The measurements behind each value: docs/results.md ("Shapes configs: the measurements behind
their values").
"""

from core_jax.config import base_config, lock
from dalle_jax.dvae import default_model_config


def get_config(arg=None):
    c = base_config()
    c.task = "dalle_jax.dvae_task"
    c.model = default_model_config()
    # 32 structure x 7 colour values (six colours + black), so a held-out colour-shape pair is two
    # trained digits the decoder can draw (docs/results.md#dvae-a-structure--colour-split-2026-12-01).
    c.model.vocab_size = 224
    c.model.colour_codes = 7
    # Widths 32/64/128/256: width at full resolution is what sharpens edges (hidden 16: less PSNR).
    c.model.hidden = 32
    c.model.width_multipliers = (1, 2, 4, 8)  # 64 -> 32 -> 16 -> 8
    c.model.blocks_per_group = 1
    c.model.decoder_init_channels = 64
    # PSNR is the goal here and MSE reached it faster than logit-Laplace.
    c.model.recon_loss = "mse"
    # Against codebook collapse: an info-max pair of terms instead of the ELB's KL (usage_weight
    # spreads codes over the batch, the negative kl_weight makes each position confident; docs/dvae.md,
    # "Objective"). Its strength trades PSNR for codebook use; both fade to a tenth over the run,
    # since collapse threatens early only (docs/results.md#dvae-the-shapes-configs-history-2026-11-28-to-2026-12-01).
    c.model.encoder_logit_norm = True  # LayerNorm before the logit conv (not in OpenAI's model)
    c.model.usage_weight = 3.0
    # 9600 images as many small steps: batch 4 beat batches 2 and 8 for the same time on 2 CPU cores.
    c.total_steps = 2400
    # The schedules span the whole run and follow --config.total_steps (a derived reference:
    # overriding one of them alone leaves total_steps alone).
    run = c.get_ref("total_steps")
    c.model.usage_weight_schedule = "cosine"
    c.model.usage_weight_end = 0.3
    c.model.usage_weight_steps = run * 1
    c.model.kl_weight_schedule = "cosine"
    c.model.kl_weight_start = -1.0
    c.model.kl_weight_end = -0.1
    c.model.kl_weight_ramp_steps = run * 1
    c.model.temperature_schedule = "exponential"  # 1 -> 1/16
    c.model.temperature_anneal_steps = run * 1
    c.batch_size = 4
    c.log_every = 200
    c.eval_every = 1200
    c.checkpoint_every = 2400
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 100
    c.optim.end_learning_rate_fraction = 0.05
    c.data.source = "shapes"
    c.data.image_size = 64
    c.data.eval_split = "test_unseen"
    c.data.caption_key = ""
    # Scenes drawn in a worker thread while the step runs: the same batches, a faster CPU step
    # (docs/data.md, "Workers while a model trains").
    c.data.num_workers = 1
    return lock(c)
