"""The unCLIP diffusion prior of Ramesh et al. 2022 (arXiv 2204.06125): a 1B decoder-only causal
transformer from a caption to a CLIP image embedding (section 2.2), with appendix C Table 3's
sizes and training recipe (column "Diffusion prior").

The conditioning sizes are the paper CLIP's (section 2.2: 1,024-dim embeddings; appendix C: text
width 1024) with CLIP's 77-token context (Radford et al. 2021); Table 3's "text encoder context"
of 256 is the prior's own caption encoding, which ours takes from CLIP's text tower instead. For
another CLIP set model.clip_dim, model.text_width and model.text_length to 0 (= that CLIP's).
Point `clip_workdir` and `data` at your files (or pre-computed embeddings, data.embeddings_dir):

python -m dalle_jax.unclip.train_prior --config configs/unclip_prior_paper.py \
    --config.clip_workdir=CW --config.data.urls='/data/{00000..09999}.tar' --workdir PW
"""

from core_jax.config import lock
from core_jax.data.config import POD_HOST_WORKERS
from dalle_jax.unclip.prior_task import prior_config


def get_config(arg=None):
    c = prior_config()
    m = c.model
    # Table 3, "Diffusion prior": width 2048, depth 24, 32 heads (64 channels each), 1B params.
    m.width, m.num_layers, m.num_heads = 2048, 24, 32
    m.mlp_ratio = 4.0  # not in the paper: the usual 4x MLP of GPT-style transformers
    m.clip_dim, m.text_width, m.text_length = 1024, 1024, 77
    m.stats_examples = 100_000
    m.eval_max_batches = 10
    # Section 2.2 / Table 3: 1000 diffusion steps, cosine schedule, x0 prediction; 64 sampling
    # steps (with analytic-DPM's variance, Bao et al. 2022, which is not implemented: DDIM here).
    c.diffusion.schedule, c.diffusion.timesteps, c.diffusion.prediction = "cosine", 1000, "x0"
    c.sample.sampler, c.sample.steps = "ddim", 64
    # Table 3, "Diffusion prior": batch 4096, 600K iterations, learning rate 1.1e-4, Adam b2 0.96,
    # eps 1e-6, weight decay 6.0e-2, EMA 0.9999; appendix C: AdamW with b1 = 0.9. No schedule or
    # warm-up is named: the rate is held after a 1000-step warm-up.
    c.batch_size = 4096
    c.total_steps = 600_000
    c.optim.learning_rate = 1.1e-4
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.96, 1e-6
    c.optim.weight_decay = 6.0e-2
    c.optim.schedule, c.optim.warmup_steps = "constant", 1000
    c.ema_decay = 0.9999
    c.compute_dtype = "bfloat16"
    c.remat = "full"
    # 1.2B params: shard them (and their Adam moments and EMA) ZeRO-3 style over fsdp.
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.data.source = "webdataset"
    c.data.eval_split = "validation"
    c.data.num_workers = POD_HOST_WORKERS  # JPEG decoding in worker threads
    c.log_every = 100
    c.checkpoint_every = 2000
    c.eval_every = 10000
    return lock(c)
