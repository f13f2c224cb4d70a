"""A small dVAE on the built-in shapes suite: 64x64 -> 8x8 tokens, 256 codes, sized for CPU.

The evaluator reports PSNR and codebook usage on `test_unseen` (held-out colour-shape pairs).
Target: PSNR >= 30 dB with >= 90% of the codebook used, after configs/dvae_shapes_decoder.py.
What it reaches, and the measurements behind each value: docs/results.md ("Shapes configs: the
measurements behind their values"). `configs/dvae_shapes.py:colour_split` is a shapes-only
experiment (dalle_jax/experiments); its DALL-E needs `--config.model.image_vocab_size=224`.
"""

from core_jax.config import base_config, lock
from dalle_jax.dvae import default_model_config


def get_config(arg=None):
    c = base_config()
    c.task = "dalle_jax.dvae_task"
    c.model = default_model_config()
    # OpenAI's model at small size on a plain codebook of 256 codes.
    c.model.vocab_size = 256
    # Widths 32/64/128/256: width at full resolution is what sharpens edges (hidden 16: less PSNR).
    c.model.hidden = 32
    c.model.width_multipliers = (1, 2, 4, 8)  # 64 -> 32 -> 16 -> 8
    c.model.blocks_per_group = 1
    c.model.decoder_init_channels = 64
    # The paper's objective, the ELB (Ramesh et al. 2021, sec. 2.1): reconstruction plus beta x KL
    # to the uniform prior, gumbel-softmax relaxed. MSE as the reconstruction (a Gaussian
    # likelihood, unscaled, hence the small beta), ramped from 0 early as the paper does.
    c.model.recon_loss = "mse"
    run = c.get_ref("total_steps")
    c.model.kl_weight_schedule = "cosine"
    c.model.kl_weight_start = 0.0
    c.model.kl_weight_end = 0.01
    c.model.kl_weight_ramp_steps = run // 4
    # Not in the paper, general: a codebook-diversity term, log K - H(batch-average codes), as
    # wav2vec 2.0's (Baevski et al. 2020, sec. 3.2); without it the ELB collapsed to a few codes
    # (docs/results.md#shapes-on-the-papers-mechanisms-three-seeds-2-core-amd-epyc-2026-12-07).
    # It fades to a tenth: collapse threatens early only.
    c.model.usage_weight = 3.0
    c.model.usage_weight_schedule = "cosine"
    c.model.usage_weight_end = 0.3
    c.model.usage_weight_steps = run * 1
    # 9600 images as many small steps: batch 4 beat batches 2 and 8 for the same time on 2 CPU cores.
    c.total_steps = 2400
    c.model.temperature_schedule = "exponential"  # 1 -> 1/16, the paper's range
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
    if arg == "colour_split":
        colour_split_experiment(c.model, run)
    elif arg:
        raise ValueError(f"configs/dvae_shapes.py: unknown preset {arg!r} (use 'colour_split')")
    return lock(c)


def colour_split_experiment(m, run):
    """`configs/dvae_shapes.py:colour_split`: the shapes-only experiment measured in docs/results.md
    (the structure / colour split, 32 x 7 codes), with the objective it was tuned with: an
    info-max pair (usage term plus a negative KL weight, not the ELB) and a LayerNorm before the
    logits (neither in the paper)."""
    m.vocab_size, m.colour_codes = 224, 7
    m.encoder_logit_norm = True
    m.kl_weight_start, m.kl_weight_end = -1.0, -0.1
    m.kl_weight_ramp_steps = run * 1
