"""The DALL-E paper's transformer (Ramesh et al. 2021): 12B params, 64 layers, 62 heads of 64.

256 BPE text tokens (16384-token vocab, one pad id per position) + 32x32 dVAE tokens (8192 codes);
column attention in layers (i - 2) mod 4 == 0 (1-based), row attention otherwise, an 11x11
convolutional mask in the last layer (appendix B.1 and Figure 11; dalle_jax/masks.py); loss 1/8
text + 7/8 image. Optimiser as in the paper's appendix B.2: AdamW (0.9, 0.96, eps 1e-8), weight
decay 4.5e-2, gradient clip 4, lr warmed up to 4.5e-4 over 5000 updates, 430k updates at batch
1024 (we decay the lr with a cosine to 1/32 of the peak instead of the paper's five halvings on
plateau), an EMA of the weights with decay 0.999 (B.2 averages every 25 updates; we every update).
Images as in the paper's Listing 2: a random square crop, resized to t x t for a random t in
[256, 9/8 * 256], a random 256 crop, no flips (the listing centres the first crop's offset in the
middle quarter of the excess; ours is uniform).
Captions: lowercased, BPE with a 16384-token vocabulary and BPE dropout 0.1 on training captions
(appendix B.2: "We also apply 10% BPE dropout when BPE-encoding the captions for training";
`text.bpe_dropout`).
The paper used no caption dropout; set model.caption_dropout > 0 to train for guidance
(`generate --cond_scale` refuses a model trained without it).
Point `dvae_workdir` and `data` at your files, and the tokenizer at your captions: `text.merges_file`
(a merges file, e.g. from `python -m core_jax.text.train_bpe --captions_file F --vocab_size 16384`)
or `text.train_source=F` (trained into the workdir). Left as they are, the run stops with an error
instead of training a tokenizer on the shapes captions.
"""

from core_jax.config import lock
from core_jax.data.config import POD_HOST_WORKERS
from dalle_jax.run_config import dalle_config


def get_config(arg=None):
    c = dalle_config()
    m = c.model
    m.text_len = c.text.context_length = 256
    m.text_vocab_size = 16384
    c.text.vocab_size = 16384
    c.text.bpe_dropout = 0.1  # on training captions (appendix B.2)
    m.image_grid, m.image_vocab_size = 32, 8192
    m.d_model, m.num_heads, m.head_dim, m.num_layers = 3968, 62, 64, 64
    m.mlp_dim = 4 * 3968
    m.attention_pattern = "paper"
    m.conv_kernel = 11
    m.legacy_masks = False  # the paper's masks (dalle_jax/masks.py); True only for old checkpoints
    m.caption_dropout = 0.0
    m.eval_max_batches = 10
    c.compute_dtype = "bfloat16"
    c.remat = "full"
    c.scan_layers = True
    # 62 heads split only 2 ways; shard the 12B params ZeRO-3 style over fsdp instead.
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.batch_size = 1024
    c.total_steps = 430_000
    c.optim.learning_rate = 4.5e-4
    c.optim.warmup_steps = 5000
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.96, 1e-8
    c.optim.weight_decay = 4.5e-2
    c.optim.grad_clip_norm = 4.0
    c.optim.end_learning_rate_fraction = 1.0 / 32  # the paper ended 32x below the peak
    c.data.source = "webdataset"
    c.data.image_size = 256
    # Listing 2: random square crop, resize to [1, 9/8] x 256, random 256 crop; no flips (text).
    c.data.random_crop = True
    c.data.random_resize_range = (1.0, 9 / 8)
    c.data.random_flip = False
    c.ema_decay = 0.999  # appendix B.2
    c.data.eval_split = "validation"
    c.data.num_workers = POD_HOST_WORKERS  # JPEG decoding in worker threads
    c.checkpoint_every = 2000
    c.eval_every = 10000
    c.log_every = 100
    return lock(c)
