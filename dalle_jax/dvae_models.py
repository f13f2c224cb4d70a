"""Which dVAE a config builds: OpenAI's model (dalle_jax/dvae.py) or an experiment on it.

The experiments (dalle_jax/experiments) build on dalle_jax/dvae.py, so the choice between them
lives here, above both, and dvae.py never imports what builds on it. Training, the API and the
benchmarks build through this module; dvae.py alone builds OpenAI's architecture (converters).
"""

from __future__ import annotations

from dalle_jax import dvae
from dalle_jax.experiments import colour_split_dvae


def experiment(model_config):
    """The experiment module `config.model` selects, or None for OpenAI's model. A selected
    module provides `make_dvae(model_config, **dvae_fields)`, `forward_flops(model_config,
    image_size, soft_codes)` and `eval_metrics(model_config, code_histogram)`."""
    if int(model_config.get("colour_codes", 0)):
        return colour_split_dvae
    return None


def make_dvae(model_config, compute_dtype: str = "float32", remat: str = "none"):
    """The dVAE module `config.model` describes (configs/dvae_openai.py lists the keys)."""
    fields = dvae.dvae_fields(model_config, compute_dtype, remat)
    variant = experiment(model_config)
    return dvae.DVAE(**fields) if variant is None else variant.make_dvae(model_config, **fields)


def forward_flops(model_config, image_size: int, soft_codes: bool = True) -> tuple[int, int]:
    """(encoder, decoder) forward FLOPs for one image of the model `config.model` builds."""
    variant = experiment(model_config)
    if variant is None:
        return dvae.forward_flops(model_config, image_size, soft_codes)
    return variant.forward_flops(model_config, image_size, soft_codes)
