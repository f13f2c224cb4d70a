"""dVAE with OpenAI's released sizes and the DALL-E paper's training recipe (256x256 -> 32x32 tokens).

Paper (Ramesh et al. 2021, appendix A.2): batch 512, AdamW (0.9, 0.999, eps 1e-8, wd 1e-4),
lr 1e-4 cosine-decayed to 1.25e-6, 3M updates; KL weight 0 -> 6.6 over the first 5000 updates;
temperature 1 -> 1/16 over the first 150,000 updates (cosine). Point `data` at your images
(webdataset / folder / tfds) with --config.data.* overrides.
"""
from core_jax.config import base_config, lock
from core_jax.data.config import POD_HOST_WORKERS
from dalle_jax.dvae import default_model_config


def get_config(arg=None):
    c = base_config()
    c.task = "dalle_jax.dvae_task"
    c.model = default_model_config()  # OpenAI: 8192 codes, hidden 256, 4 groups x 2 blocks, init 128
    c.total_steps = 3_000_000
    c.batch_size = 512
    c.compute_dtype = "bfloat16"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.optim.learning_rate = 1e-4
    c.optim.end_learning_rate_fraction = 1.25e-6 / 1e-4
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = 2000
    c.checkpoint_every = 5000
    c.eval_every = 10000
    c.log_every = 100
    c.data.source = "webdataset"
    c.data.image_size = 256
    c.data.random_crop = True
    c.data.eval_split = "validation"
    c.data.caption_key = ""  # the dVAE needs images only
    c.data.num_workers = POD_HOST_WORKERS  # JPEG decoding in worker threads
    c.model.eval_max_batches = 20
    return lock(c)
