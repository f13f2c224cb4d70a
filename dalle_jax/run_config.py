"""The DALL-E's config: its defaults, and the one place a run's config is checked and turned into
what training (dalle_task) and inference (pipeline) are built from.

`resolve_run(config, workdir)` checks a training config and returns a frozen `DalleRun`: the model's
`DalleConfig`, the tokenizer, the dVAE, caption dropout and the loss weights, and the run config
with the keys a run derives filled in (the text vocabulary from the tokenizer, the dVAE from the
token shards' index). The config passed in is never changed. Inference rebuilds a model from a
workdir's config.json with the same pieces: `text_vocab_size`, `load_dvae`, `attached_dvae`,
`with_derived`. A leaf under both, so inference imports neither the training task nor a CLI.
"""

from __future__ import annotations

import dataclasses
import json

import ml_collections

from core_jax import checkpoint, storage
from core_jax.config import base_config
from core_jax.data.token_shards import TokenShardSource, listed_shards, read_index
from core_jax.errors import ConfigError
from core_jax.text import BPETokenizer, tokenizer_from_config, training_tokenizer
from dalle_jax import masks
from dalle_jax.dvae_api import DVAE, check_dvae_workdir
from dalle_jax.transformer import DalleConfig

DECODER_FILE = "decoder.json"


def dalle_config():
    """base_config() + DALL-E's sections with defaults (unlocked; config files lock it)."""

    c = base_config()
    c.task = "dalle_jax.dalle_task"
    c.model = ml_collections.ConfigDict(
        dict(
            text_len=16,
            text_vocab_size=0,  # 0 = the tokenizer's vocabulary (pads are vocab + position)
            image_grid=8,  # dVAE grid side; the stream holds image_grid**2 image tokens
            image_vocab_size=512,  # dVAE codebook size
            d_model=256,
            num_heads=4,
            head_dim=64,
            num_layers=4,
            mlp_dim=1024,
            attention_pattern="full",  # 'full' | 'paper' | one kind | comma list of full,row,column,conv
            conv_kernel=5,  # odd; the k x k window of 'conv' layers (paper: 11)
            legacy_masks=False,  # True: the row/column/conv masks of older versions (masks.py)
            # Ramesh et al. 2021, section 2.2: the text tokens' cross-entropy weighs 1/8, the image
            # tokens' 7/8 (the model is mostly for images).
            text_loss_weight=1.0 / 8,
            image_loss_weight=7.0 / 8,
            caption_dropout=0.1,  # dropped captions become all-pad text (guidance's uncond stream)
            eval_max_batches=8,  # eval-split batches per evaluation; -1 = all, 0 = no evaluator
        )
    )
    c.text = ml_collections.ConfigDict(
        dict(
            merges_file="",  # '' trains a BPE on text.train_source into WORKDIR/tokenizer
            vocab_size=512,  # requested BPE size (the shapes captions give fewer tokens)
            context_length=16,  # must equal model.text_len
            pad_mode="per_position",
            train_source="",  # '' = the shapes captions, allowed only with data.source='shapes'
            bpe_dropout=0.0,  # training captions only (the DALL-E paper: 0.1)
        )
    )
    c.dvae_workdir = ""  # the dVAE that turns images into tokens (on-the-fly encoding)
    return c


@dataclasses.dataclass(frozen=True)
class DalleRun:
    """A training config, checked, with everything the DALL-E task is built from."""

    # The run config with model.text_vocab_size and dvae_workdir resolved: what config.json records.
    config: ml_collections.FrozenConfigDict
    cfg: DalleConfig
    tokenizer: BPETokenizer | None  # None: shapes only (core_jax.aot), no tokenizer or dVAE
    train_tokenizer: BPETokenizer | None  # `tokenizer` with text.bpe_dropout: training captions only
    dvae: DVAE | None  # encodes images on the fly and decodes samples; None: pre-encoded data
    caption_dropout: float  # in [0, 1): the fraction of training captions replaced by all pads
    text_loss_weight: float
    image_loss_weight: float
    eval_max_batches: int  # -1 = the whole eval split, 0 = no evaluator

    @property
    def abstract(self) -> bool:
        return self.tokenizer is None


def resolve_run(config, workdir: str | None = None) -> DalleRun:
    """Checks a DALL-E training config (ConfigError names the first problem) and derives the run:
    trains the tokenizer into the workdir when text.merges_file is empty, takes model.text_vocab_size
    0 from it, and loads the dVAE of config.dvae_workdir (or of the token shards' index). With
    `workdir` None and text_vocab_size > 0 the run is abstract: shapes only, nothing loaded."""

    dropout = float(config.model.caption_dropout)
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"config.model.caption_dropout must be in [0, 1), got {dropout}")
    check_trained_masks(config, workdir)
    tokenizer = train_tokenizer = None
    vocab = int(config.model.text_vocab_size)
    dvae_workdir = str(config.get("dvae_workdir", "") or "")
    if not (workdir is None and vocab > 0):  # else abstract: core_jax.aot needs shapes only
        # The dVAE and the token shards are checked before the tokenizer is trained into the
        # workdir, so that a mistake in either leaves the workdir as it was.
        if dvae_workdir:
            try:
                check_dvae_workdir(dvae_workdir)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"config.dvae_workdir: {e}") from None
        shards_dvae = token_shards_dvae(config) if config.data.source == "tokens" else ""
        tokenizer = tokenizer_from_config(config.text, workdir, data_source=config.data.source)
        vocab = text_vocab_size(config, tokenizer)
        train_tokenizer = training_tokenizer(tokenizer, config.text)
        dvae_workdir = dvae_workdir or shards_dvae
    derived = with_derived(config, text_vocab_size=vocab, dvae_workdir=dvae_workdir)
    try:
        cfg = DalleConfig.from_config(derived)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dvae = None if tokenizer is None else load_dvae(dvae_workdir, cfg)
    if dvae is None and config.data.source == "shapes" and tokenizer is not None:
        raise ConfigError(
            "config.dvae_workdir is empty but the shapes source has no image tokens: "
            "train a dVAE (configs/dvae_shapes.py) and pass --config.dvae_workdir=DIR"
        )
    m = config.model
    return DalleRun(
        config=derived,
        cfg=cfg,
        tokenizer=tokenizer,
        train_tokenizer=train_tokenizer,
        dvae=dvae,
        caption_dropout=dropout,
        text_loss_weight=float(m.text_loss_weight),
        image_loss_weight=float(m.image_loss_weight),
        eval_max_batches=int(m.eval_max_batches),
    )


def with_derived(config, *, text_vocab_size: int, dvae_workdir: str) -> ml_collections.FrozenConfigDict:
    """A frozen copy of `config` holding the text vocabulary and the dVAE a run derived (config.json
    records them, so inference rebuilds the same model and decodes with the same dVAE)."""
    derived = config.copy_and_resolve_references()
    with derived.unlocked():
        derived.model.text_vocab_size = int(text_vocab_size)
        derived.dvae_workdir = str(dvae_workdir)
    return ml_collections.FrozenConfigDict(derived)


def check_trained_masks(config, workdir: str | None) -> None:
    """Before the trainer loads params, ConfigError if they were trained with other attention masks
    than this run's: the workdir's own checkpoints when it resumes, else config.init_from's."""

    init_from = str(config.get("init_from", "") or "")
    if workdir and checkpoint.latest_step(workdir) is not None:
        source, path = workdir, workdir
    elif init_from:
        source, path = f"{init_from} (config.init_from)", init_from
    else:
        return
    if storage.isfile(storage.join(path, "config.json")):  # else the trainer reports what is missing
        masks.check_trained_masks(config, checkpoint.read_config(path), source)


def token_shards_dvae(config) -> str:
    """Pre-encoded shards must match the model's grid and codebook, and the index must list, for
    the training split (and the eval split when the run evaluates), shards that exist inside its
    folder; returns the dVAE their index.json names ('' if none), so sample grids, the workdir's
    config.json and `generate` all decode with the dVAE the tokens came from."""
    data_dir = str(config.data.data_dir)
    splits = [str(config.data.split)]
    if int(config.model.eval_max_batches) != 0:
        splits.append(str(config.data.eval_split))
    try:
        index = read_index(data_dir)
        for split in dict.fromkeys(splits):
            listed_shards(
                data_dir, index, split, source=TokenShardSource.source, writer=TokenShardSource.writer
            )
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    grid, codes = int(config.model.image_grid), int(config.model.image_vocab_size)
    if (int(index["grid_size"]), int(index["vocab_size"])) != (grid, codes):
        raise ConfigError(
            f"token shards in {config.data.data_dir} are {index['grid_size']}x{index['grid_size']} "
            f"tokens of a {index['vocab_size']}-code dVAE; the model expects {grid}x{grid} and "
            f"{codes} (model.image_grid, model.image_vocab_size)"
        )
    return str(index.get("dvae_workdir") or "")


def text_vocab_size(config, tokenizer) -> int:
    """model.text_vocab_size, checked against the tokenizer: 0 = the tokenizer's vocabulary;
    otherwise it must match, since the pad ids `vocab + i` depend on it."""
    if str(config.text.get("pad_mode", "")) != "per_position":
        raise ConfigError(
            f"config.text.pad_mode must be 'per_position' for DALL-E, got {config.text.get('pad_mode')!r}"
        )
    if int(config.text.context_length) != int(config.model.text_len):
        raise ConfigError(
            f"config.text.context_length={config.text.context_length} must equal "
            f"config.model.text_len={config.model.text_len}"
        )
    given = int(config.model.text_vocab_size)
    if given not in (0, tokenizer.vocab_size):
        raise ConfigError(
            f"config.model.text_vocab_size={given} but the tokenizer ({tokenizer.path}) has "
            f"{tokenizer.vocab_size} tokens; set it to {tokenizer.vocab_size} or 0 (= take the "
            f"tokenizer's)"
        )
    return int(tokenizer.vocab_size)


def attached_dvae(workdir: str, trained_with: str) -> str | None:
    """The dVAE workdir attached to a DALL-E workdir (None if none is). `trained_with` is config.json's
    dvae_workdir: an attachment made for another one is stale and an error, not silently used."""
    path = storage.join(workdir, DECODER_FILE)
    if not storage.isfile(path):
        return None
    record = json.loads(storage.read_text(path))
    if storage.absolute(record["tokens_from"]) != storage.absolute(trained_with):
        raise ValueError(
            f"{path} attaches {record['dvae_workdir']} to tokens of "
            f"{record['tokens_from']}, but {workdir}/config.json now says the DALL-E "
            f"was trained on {trained_with}'s: run dalle_jax.attach_decoder again or "
            f"delete {path}"
        )
    return str(record["dvae_workdir"])


def load_dvae(workdir: str, cfg: DalleConfig, raw_weights: bool = False) -> DVAE | None:
    """The dVAE of `workdir` (None when it is ''), checked against the model's grid and codebook:
    its EMA weights when it kept one (so training tokenizes with the weights inference decodes with)."""
    if not workdir:
        return None
    try:
        dvae = DVAE.load(workdir, raw_weights=raw_weights)
    except ValueError as e:  # not a dVAE workdir: a config mistake, reported as one
        raise ConfigError(f"config.dvae_workdir: {e}") from None
    if int(dvae.grid_size) != cfg.image_grid or int(dvae.vocab_size) != cfg.image_vocab_size:
        raise ConfigError(
            f"the dVAE in {workdir} has a {dvae.grid_size}x{dvae.grid_size} grid and "
            f"{dvae.vocab_size} codes but config.model says image_grid={cfg.image_grid}, "
            f"image_vocab_size={cfg.image_vocab_size}"
        )
    return dvae
