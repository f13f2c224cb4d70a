"""The unCLIP decoder of Ramesh et al. 2022 (arXiv 2204.06125): GLIDE's 64x64 U-Net conditioned on
the CLIP image embedding and the caption's CLIP token states (dalle_jax/unclip/unet_spec.py
PRESETS['decoder_paper'], appendix C Table 3), trained with Table 3's optimiser, batch and EMA.

The conditioning sizes are the paper CLIP's (appendix C: text width 1024; section 2.2: 1,024-dim
embeddings) with CLIP's 77-token context (Radford et al. 2021); for another CLIP set
model.clip_dim, model.text_width and model.text_length to 0 (= that CLIP's). Point
`clip_workdir` and `data` at your files:

python -m dalle_jax.unclip.train_decoder --config configs/unclip_decoder_paper.py \
    --config.clip_workdir=CW --config.data.urls='/data/{00000..09999}.tar' --workdir DW
"""

from core_jax.config import lock
from core_jax.data.config import POD_HOST_WORKERS
from dalle_jax.unclip.decoder_task import decoder_config
from dalle_jax.unclip.diffusion_task import apply_preset


def get_config(arg=None):
    c = decoder_config()
    apply_preset(
        c.model, "decoder_paper"
    )  # channels 512, depth 3, mult 1,2,3,4, attention 32,16,8, dropout 0.1
    c.model.text_length = 77
    c.model.eval_max_batches = 10
    # Table 3, column "64": batch 2048, 800K iterations, learning rate 1.2e-4, Adam b2 0.999,
    # eps 1e-8, EMA 0.9999; appendix C: Adam with decoupled weight decay and b1 = 0.9. Table 3 gives
    # the decoder no weight decay, nor does the paper name a rate schedule or warm-up: we hold the
    # rate after a 1000-step warm-up.
    c.batch_size = 2048
    c.total_steps = 800_000
    c.optim.learning_rate = 1.2e-4
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.weight_decay = 0.0
    c.optim.schedule, c.optim.warmup_steps = "constant", 1000
    c.ema_decay = 0.9999
    c.compute_dtype = "bfloat16"
    c.remat = "full"
    # 2.25B params: shard them (and their Adam moments and EMA) ZeRO-3 style over fsdp.
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.data.source = "webdataset"
    c.data.eval_split = "validation"
    c.data.num_workers = POD_HOST_WORKERS  # JPEG decoding in worker threads
    c.log_every = 100
    c.checkpoint_every = 2000
    c.eval_every = 10000
    return lock(c)
