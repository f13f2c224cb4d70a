"""A small dVAE on the built-in shapes suite: 64x64 -> 8x8 tokens, 224 codes, sized for CPU.

The evaluator reports PSNR and codebook usage on `test_unseen` (held-out colour-shape pairs).
Issue target: PSNR >= 30 dB with >= 90% of the codebook used. Measured (docs/dvae.md, "A structure
/ colour split"): these 2400 steps of batch 4 (~6 min on 2 CPU cores) give 26.85 / 26.72 dB with
94.6% / 96.9% of the codes used (seeds 0 / 1); configs/dvae_shapes_decoder.py then fine-tunes the
decoder to 33.52 / 33.93 dB (12000 steps of batch 8, ~17 min).
"""
from core_jax.config import base_config, lock
from dalle_jax.dvae import default_model_config


def get_config(arg=None):
    c = base_config()
    c.task = "dalle_jax.dvae_task"
    c.model = default_model_config()
    # "A small codebook", split into structure and colour: each code is one of 32 structure values
    # (read by the encoder from a hue-blind view of the image) times one of 7 colour values (read
    # from each token cell's colours; value 0 is the dark cells'), so a colour-shape pair the
    # training images never held is two trained digits, and the decoder draws it (docs/dvae.md,
    # "A structure / colour split"). 7 = the suite's six colours + black: with 8 one value stays
    # unused and at most 224 of 256 codes can be. The plain codebook (colour_codes=0, 256 codes)
    # draws the held-out pairs worse than the seen ones and stops near 27 dB.
    c.model.vocab_size = 224
    c.model.colour_codes = 7
    # Widths 32/64/128/256. Width at full resolution is what sharpens edges: hidden 16 gave
    # 0.5-0.9 dB less at equal steps for ~40% less time; a second block per group gave nothing.
    c.model.hidden = 32
    c.model.width_multipliers = (1, 2, 4, 8)  # 64 -> 32 -> 16 -> 8
    c.model.blocks_per_group = 1
    c.model.decoder_init_channels = 64
    # PSNR is the goal here and MSE reached it faster than logit-Laplace in our runs.
    c.model.recon_loss = "mse"
    # Against codebook collapse (without these only ~3-14 codes end up in use): an info-max pair of
    # terms instead of the ELB's KL. usage_weight pushes the batch-average code distribution to
    # uniform; the negative KL weight rewards confident codes at each position, which the usage term
    # alone does not (alone, it was met by flat, uninformative logits). Together, with equal weights,
    # they would be -weight * I(x; code); the usage term is weighted more so codes stay spread.
    # Its strength trades PSNR for codebook use: most of an image is black background, and a
    # strictly uniform code distribution spends most codes on it (constant usage 10 / KL -2:
    # 23.8 dB, all codes used; 3 / -1: 24.6 dB, 98-100%; 1 / -0.5: 25.3 dB but 88%). Collapse is
    # a danger early; once the decoder relies on the codes they stay in use, so both terms fade
    # (cosine) to a tenth over the run (+0.4 dB on two seeds at batch 8, all codes kept).
    c.model.encoder_logit_norm = True         # LayerNorm before the logit conv (not in OpenAI's model)
    c.model.usage_weight = 3.0
    # Many small steps beat fewer large ones on the same images, and on this CPU small batches run
    # about as many examples per second as large ones. 9600 images (seeds 0 / 1 / 2; test_unseen
    # PSNR and checker ceiling seen / unseen): as 4 x 2400 steps 25.58 / 25.54 dB (0.76 / 0.57,
    # 0.78 / 0.63); as 2 x 4800 25.79 / 24.91 / 25.04 dB (0.84 / 0.71, 0.77 / 0.50, 0.74 / 0.53);
    # as 8 x 1200 24.99 / 25.03 dB (0.69 / 0.52, 0.73 / 0.55); each ~6 minutes on 2 cores.
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
    # Scenes drawn in a worker thread while the step runs: the same batches bit for bit, and on
    # the 2-core AMD EPYC 83 instead of 97 ms per step (means of four alternating pairs of runs).
    # The decoder fine-tuning inherits it (93 against 95 ms, within noise); the CLIP and DALL-E
    # steps did not get faster (docs/data.md, "Workers while a model trains").
    c.data.num_workers = 1
    return lock(c)
