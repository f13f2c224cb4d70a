"""dVAE with OpenAI's released sizes and the DALL-E paper's training recipe (256x256 -> 32x32 tokens).

Every number below is from Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation"
(arXiv 2102.12092), appendix A.2 "Training" and its Listing 1 (the dVAE's data augmentation).
Point `data` at your images (webdataset / folder / tfds) with --config.data.* overrides.
"""

from core_jax.config import base_config, lock
from core_jax.data.config import POD_HOST_WORKERS
from dalle_jax.dvae import default_model_config


def get_config(arg=None):
    c = base_config()
    c.task = "dalle_jax.dvae_task"
    c.model = default_model_config()  # OpenAI: 8192 codes, hidden 256, 4 groups x 2 blocks, init 128
    # A.2: "It is trained for a total of 3,000,000 updates" with "a total batch size of 512".
    c.total_steps = 3_000_000
    c.batch_size = 512
    # A.2 trains in float16 mixed precision with loss scaling; bfloat16 needs no loss scale.
    c.compute_dtype = "bfloat16"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    # A.2: AdamW with beta1 = 0.9, beta2 = 0.999, eps = 1e-8 and weight decay multiplier 1e-4.
    c.optim.name = "adamw"
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.weight_decay = 1e-4
    # A.2: "The step size is annealed from 1e-4 to 1.25e-6 over 1,200,000 updates" with a cosine
    # schedule, and stays at 1.25e-6 for the rest of the 3M updates. A.2 names no warm-up.
    c.optim.learning_rate = 1e-4
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 0
    c.optim.decay_steps = 1_200_000
    c.optim.end_learning_rate_fraction = 1.25e-6 / 1e-4
    # A.2 names no gradient clipping for the dVAE (B.2 clips the transformer's, at norm 4).
    c.optim.grad_clip_norm = 0.0
    # A.2: "exponentially weighted iterate averaging for the parameters with decay coefficient 0.999".
    c.ema_decay = 0.999
    # A.2, cosine schedules: KL weight beta 0 -> 6.6 over the first 5000 updates; relaxation
    # temperature 1 -> 1/16 over the first 150,000 updates.
    c.model.kl_weight_start, c.model.kl_weight_end = 0.0, 6.6
    c.model.kl_weight_ramp_steps, c.model.kl_weight_schedule = 5000, "cosine"
    c.model.temperature_start, c.model.temperature_end = 1.0, 1.0 / 16
    c.model.temperature_anneal_steps, c.model.temperature_schedule = 150_000, "cosine"
    c.checkpoint_every = 5000
    c.eval_every = 10000
    c.log_every = 100
    c.data.source = "webdataset"
    # Listing 1 (target_res = 256): random square crop of the shorter side, area-resized to a
    # random t in [9/8, 12/8] x 256 (at most the shorter side), random 256 crop, and
    # tf.image.random_flip_left_right (probability 1/2).
    c.data.image_size = 256
    c.data.random_crop = True
    c.data.random_resize_range = (9 / 8, 12 / 8)
    c.data.random_flip = True
    c.data.eval_split = "validation"
    c.data.caption_key = ""  # the dVAE needs images only
    c.data.num_workers = POD_HOST_WORKERS  # JPEG decoding in worker threads
    c.model.eval_max_batches = 20
    return lock(c)
