"""Decoder fine-tuning of a trained shapes dVAE: sharper reconstructions, the same tokens.

    python -m dalle_jax.train_dvae --config configs/dvae_shapes_decoder.py --workdir runs/dvae_dec \
        --config.init_from=runs/demo/dvae

Starts from the params of `init_from` (a configs/dvae_shapes.py run), freezes the encoder and trains
the decoder on the encoder's argmax codes, the codes inference uses. The encoder stays bit-identical,
so a DALL-E trained on the original dVAE's tokens samples the same tokens, and
`--dvae_workdir runs/dvae_dec` on generate / evaluate_fidelity decodes them with the new decoder.
Measured on the demo's dVAE: docs/dvae.md, "Decoder fine-tuning".
"""
from core_jax.app import load_config
from core_jax.config import lock


def get_config(arg=None):
    c = load_config("configs/dvae_shapes.py")
    c.unlock()
    c.init_from = arg or ""
    c.frozen = "encoder"
    c.model.train_codes = "argmax"
    # Without the encoder's backward pass a step costs about two thirds of a joint one; batch 8
    # at lr 1e-3 improved test_unseen PSNR steadily in a 6000-step probe (docs/dvae.md).
    c.batch_size = 8
    c.total_steps = 3000
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 50
    c.optim.end_learning_rate_fraction = 0.05
    c.log_every = 200
    c.eval_every = 1500
    c.checkpoint_every = 1500
    return lock(c)
