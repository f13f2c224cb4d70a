"""What training (dalle_task) and inference (pipeline) both need to rebuild a DALL-E from its
config: the text-vocabulary check and the dVAE its tokens come from or decode with (the one it was
trained on, or a decoder attached since by dalle_jax.attach_decoder). A leaf, so that inference
imports neither the training task nor a CLI.
"""

from __future__ import annotations

import json
import os

from core_jax.errors import ConfigError
from dalle_jax.dvae_api import DVAE
from dalle_jax.transformer import DalleConfig

DECODER_FILE = "decoder.json"


def attached_dvae(workdir: str, trained_with: str) -> str | None:
    """The dVAE workdir attached to a DALL-E workdir (None if none is). `trained_with` is config.json's
    dvae_workdir: an attachment made for another one is stale and an error, not silently used."""
    path = os.path.join(workdir, DECODER_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if os.path.abspath(record["tokens_from"]) != os.path.abspath(trained_with):
        raise ValueError(
            f"{path} attaches {record['dvae_workdir']} to tokens of "
            f"{record['tokens_from']}, but {workdir}/config.json now says the DALL-E "
            f"was trained on {trained_with}'s: run dalle_jax.attach_decoder again or "
            f"delete {path}"
        )
    return str(record["dvae_workdir"])


def resolve_text_vocab(config, tokenizer) -> None:
    """`model.text_vocab_size` 0 = the tokenizer's vocabulary (written back, so config.json holds
    it); otherwise it must match, since the pad ids `vocab + i` depend on it."""
    if str(config.text.get("pad_mode", "")) != "per_position":
        raise ConfigError(
            f"config.text.pad_mode must be 'per_position' for DALL-E, got {config.text.get('pad_mode')!r}"
        )
    if int(config.text.context_length) != int(config.model.text_len):
        raise ConfigError(
            f"config.text.context_length={config.text.context_length} must equal "
            f"config.model.text_len={config.model.text_len}"
        )
    if int(config.model.text_vocab_size) == 0:
        config.model.text_vocab_size = int(tokenizer.vocab_size)
    elif int(config.model.text_vocab_size) != tokenizer.vocab_size:
        raise ConfigError(
            f"config.model.text_vocab_size={config.model.text_vocab_size} but the "
            f"tokenizer ({tokenizer.path}) has {tokenizer.vocab_size} tokens; set it to "
            f"{tokenizer.vocab_size} or 0 (= take the tokenizer's)"
        )


def load_dvae(config, cfg: DalleConfig, raw_weights: bool = False):
    """The dVAE of `config.dvae_workdir` (None when unset), checked against the model's grid: its
    EMA weights when it kept one (so training tokenizes with the weights inference decodes with)."""
    workdir = str(config.get("dvae_workdir", "") or "")
    if not workdir:
        return None
    dvae = DVAE.load(workdir, raw_weights=raw_weights)
    if int(dvae.grid_size) != cfg.image_grid or int(dvae.vocab_size) != cfg.image_vocab_size:
        raise ConfigError(
            f"the dVAE in {workdir} has a {dvae.grid_size}x{dvae.grid_size} grid and "
            f"{dvae.vocab_size} codes but config.model says image_grid={cfg.image_grid}, "
            f"image_vocab_size={cfg.image_vocab_size}"
        )
    return dvae
