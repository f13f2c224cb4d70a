"""Which CLIP a config builds: the paper's model (clip_jax/model.py) or an experiment on it.

The experiments (clip_jax/experiments) build on clip_jax/model.py, so the choice between them
lives here, above both, and model.py never imports what builds on it. Training, evaluation and the
API build through this module; model.py alone builds the paper's architecture (converters).
"""

from __future__ import annotations

from clip_jax import model
from clip_jax.experiments import luma_chroma
from core_jax.errors import ConfigError

# model.patch_embed: rgb (the paper's patch conv) | luma_chroma (clip_jax/experiments/luma_chroma.py)
PATCH_EMBEDS = ("rgb", "luma_chroma")


def experiment(model_config):
    """The experiment module `config.model` selects, or None for the paper's model. A selected
    module provides `make_clip(model_config, spec)`."""
    # Optional keys: workdirs written before they existed (and converted weights) are "rgb".
    patch_embed = str(model_config.get("patch_embed", "rgb"))
    if patch_embed not in PATCH_EMBEDS:
        raise ConfigError(f"config.model.patch_embed must be one of {PATCH_EMBEDS}, got {patch_embed!r}")
    if patch_embed == "luma_chroma":
        return luma_chroma
    chroma_layer = int(model_config.get("chroma_layer", 0))
    if chroma_layer:
        raise ConfigError(
            f"config.model.chroma_layer={chroma_layer}: needs patch_embed='luma_chroma' (the RGB stem "
            f"has no separate colour to add later)"
        )
    return None


def clip_from_config(config) -> model.CLIP:
    """The CLIP module `config` describes (clip_jax/defaults.py `model_config` lists the keys)."""
    spec = model.spec_from_config(config)
    variant = experiment(config.model)
    return model.CLIP(spec) if variant is None else variant.make_clip(config.model, spec)
