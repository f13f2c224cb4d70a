"""Tiny CLIP on the shapes suite: 64x64 images, patch 8, trains on 2 CPU cores in minutes.

python -m clip_jax.train --config configs/clip_shapes.py --workdir /tmp/clip_shapes
"""

from core_jax.config import lock

from clip_jax.defaults import clip_config, model_config, text_config


def get_config(arg=None):
    # The paper's RGB patch stem. The luma_chroma stem, an experiment (clip_jax/experiments), is
    # `--config.model.patch_embed=luma_chroma --config.model.chroma_layer=3`; its measurements:
    # docs/results.md#clip-on-the-shapes-suite-budget-and-patch-stem-ablation-date-not-recorded
    model = model_config(
        name="shapes",
        image_size=64,
        patch_size=8,
        vision_width=128,
        vision_layers=4,
        vision_heads=4,
        text_width=128,
        text_layers=4,
        text_heads=4,
        embed_dim=128,
        activation="gelu",
        # Fixed positions keep the place captions name; the learned table lost it (results.md, "CLIP positions").
        posemb="sincos2d",
    )
    # merges_file '' trains a small BPE on the shapes captions into the workdir. The longest
    # caption is 12 tokens with it, so a context of 16 loses nothing and saves text-tower time.
    c = clip_config(
        model,
        text_config(merges_file="", vocab_size=256 + 64 + 2 + 64, context_length=16),
        evaluators="zeroshot",
    )
    c.data.source = "shapes"
    c.data.eval_split = "test_unseen"
    # Zero-shot on one-object scenes of the 4 colour-shape pairs never seen in training.
    c.eval.zeroshot_source = "shapes"
    c.eval.zeroshot_split = "test_unseen"
    # Both towers unrolled inside their scans: same params and init, a ~10% faster CPU step.
    c.scan_unroll = c.model.get_ref("vision_layers") * 1  # follows its override (text: as many)
    c.batch_size = 64
    # 400 steps, compile and the one evaluation fit in 4 minutes on 2 CPU cores; `make demo` trains
    # 250 (docs/results.md, "The demo's budget: decoder batch and CLIP steps").
    c.total_steps = 400
    c.log_every = 50
    c.eval_every = 400
    c.checkpoint_every = 400
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.1
    return lock(c)
