"""Decoder fine-tuning of a trained shapes dVAE: sharper reconstructions, the same tokens.

    python -m dalle_jax.train_dvae --config configs/dvae_shapes_decoder.py --workdir runs/dvae_dec \
        --config.init_from=runs/demo/dvae

Starts from the params of `init_from` (a configs/dvae_shapes.py run), freezes the encoder and trains
the decoder on the encoder's argmax codes, the codes inference uses. The encoder stays bit-identical,
so a DALL-E trained on the original dVAE's tokens samples the same tokens, and
`--dvae_workdir runs/dvae_dec` on generate / evaluate_fidelity decodes them with the new decoder.
How to use it: docs/dvae.md, "Decoder fine-tuning"; measurements: docs/results.md.
"""

from core_jax.config_files import load_config
from core_jax.config import lock


def get_config(arg=None):
    c = load_config("dvae_shapes")
    c.unlock()
    c.init_from = arg or ""
    c.frozen = "encoder"
    c.model.train_codes = "argmax"
    # 12000 steps: PSNR on test_unseen still rises to the end and passes 30 dB from about step 6000
    # (~17 min on 2 cores; docs/results.md#dvae-a-structure--colour-split-2026-12-01). `make demo`
    # runs 3000 steps of batch 4 for its 20-minute budget.
    c.batch_size = 8
    c.total_steps = 12000
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 50
    c.optim.end_learning_rate_fraction = 0.05
    c.log_every = 200
    c.eval_every = 3000
    c.checkpoint_every = 3000
    return lock(c)
