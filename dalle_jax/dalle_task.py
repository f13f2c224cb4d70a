"""The DALL-E transformer as a `core_jax.trainer.Task`.

Batches hold `text` int32 [B, text_len] (per-position pads) and `image_tokens` int32 [B, grid*grid]
(row-major dVAE codes). Image tokens come from one of two places:
- pre-encoded data: a raw example that carries `image_tokens` ([grid*grid] or [grid, grid]) is
  passed through untouched (`data.source='tokens'` reads encode_dataset's shards; their index.json
  must match the model's grid and codebook, and names the dVAE that decodes samples);
- on-the-fly encoding: with `config.dvae_workdir` set, example_fn keeps the cropped uint8 image and
  the Task's `batch_fn` encodes the whole process-local batch with the dVAE's jitted encoder on the
  host (one dispatch per batch, not per image).
Caption dropout (`model.caption_dropout`) is decided per training example on the host, from the
example's own rng (seed, record index, epoch): a dropped caption becomes the all-pad text, the
unconditional stream that classifier-free guidance samples with, and `caption_kept` [B] tells the
loss to leave that row out of the text term. Which captions are dropped therefore does not depend on
the number of processes or on where an example lands in the global batch.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from core_jax import checkpoint
from core_jax.config import base_config
from core_jax.data import SkipExample, image_ops
from core_jax.data.token_shards import read_index
from core_jax.errors import ConfigError
from core_jax.metrics import image_grid
from core_jax.text import tokenizer_from_config, training_tokenizer
from core_jax.trainer import Evaluator, Task, eval_batches, mean_over_micro_batches
from dalle_jax import masks, sampling
from dalle_jax import transformer as model_lib
from dalle_jax.loading import load_dvae, resolve_text_vocab


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


def image_tokens_fn(dvae):
    """uint8 images [B, H, W, 3] -> int32 [B, grid*grid] with `dvae.encode` (jitted inside the
    dVAE API), run on the host once per batch."""

    def encode(images: np.ndarray) -> np.ndarray:
        tokens = np.asarray(dvae.encode(np.asarray(images)))
        return tokens.reshape(tokens.shape[0], -1).astype(np.int32)

    return encode


def make_example_fn(config, cfg: model_lib.DalleConfig, tokenizer, encode, *, train: bool):
    size = int(config.data.image_size)
    random_crop = train and bool(config.data.random_crop)
    resize_range = tuple(config.data.get("random_resize_range", (1.0, 1.0)))
    # No random flips: captions name left and right ("a circle to the left of ...").

    dropout = caption_dropout(config.model) if train else 0.0
    if train and tokenizer is not None:
        tokenizer = training_tokenizer(tokenizer, config.text)  # text.bpe_dropout
    pads = np.asarray(model_lib.unconditional_text(cfg, 1), np.int32)[0]

    def example_fn(raw, rng):
        captions = [c for c in (raw.get("captions") or []) if c and c.strip()]
        if train and len(captions) > 1:
            caption = captions[int(rng.integers(len(captions)))]
        else:
            caption = raw.get("caption") or (captions[0] if captions else "")
        if not caption.strip():
            raise SkipExample("empty_caption")
        kept = dropout == 0 or rng.random() >= dropout
        out = {"text": tokenizer.encode([caption])[0].astype(np.int32) if kept else pads.copy()}
        if dropout > 0:
            out["caption_kept"] = np.float32(kept)
        if "image_tokens" in raw:
            tokens = np.asarray(raw["image_tokens"]).reshape(-1).astype(np.int32)
            _check_tokens(tokens[None], cfg)
            return {**out, "image_tokens": tokens}
        if encode is None:
            raise ValueError(
                "example has no 'image_tokens' and config.dvae_workdir is empty: set "
                "dvae_workdir to encode images on the fly, or use pre-encoded data"
            )
        # Encoded per batch by batch_fn (make_batch_fn).
        img = image_ops.resize_and_crop(
            np.asarray(raw["image"]), size, random_crop, rng, resize_range=resize_range
        )
        return {**out, "image": img}

    return example_fn


def _check_tokens(tokens: np.ndarray, cfg: model_lib.DalleConfig) -> None:
    if tokens.shape[1:] != (cfg.num_image_tokens,):
        raise ValueError(
            f"image_tokens has {tokens.shape[1:]} tokens per image; the model expects "
            f"{cfg.num_image_tokens} ({cfg.image_grid}x{cfg.image_grid})"
        )
    if tokens.min() < 0 or tokens.max() >= cfg.image_vocab_size:
        raise ValueError(f"image_tokens outside [0, {cfg.image_vocab_size})")


def make_batch_fn(cfg: model_lib.DalleConfig, encode):
    """Host-side, per process-local batch: uint8 images -> dVAE tokens in one encoder call."""

    def batch_fn(batch: dict) -> dict:
        if "image" not in batch:
            return batch
        batch = dict(batch)
        tokens = encode(batch.pop("image"))
        _check_tokens(tokens, cfg)
        batch["image_tokens"] = tokens
        return batch

    return batch_fn


def caption_dropout(m) -> float:
    dropout = float(m.caption_dropout)
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"config.model.caption_dropout must be in [0, 1), got {dropout}")
    return dropout


def make_loss_fn(cfg: model_lib.DalleConfig, m):
    """Text + image loss. Caption-dropped rows (`caption_kept` = 0, set by example_fn) already hold
    the all-pad text and leave the text term."""
    weights = dict(text_loss_weight=float(m.text_loss_weight), image_loss_weight=float(m.image_loss_weight))

    def loss_fn(params, batch, rng, step):
        keep = batch.get("caption_kept")
        divisor = batch.get("_text_divisor")  # set by accum_grads_fn, the same in every row
        loss, metrics = model_lib.loss_and_metrics(
            params,
            cfg,
            batch["text"],
            batch["image_tokens"],
            text_row_weight=keep,
            row_weight=batch.get("_mask"),
            text_divisor=None if divisor is None else divisor[0],
            **weights,
        )
        if keep is not None:
            metrics["captions_dropped"] = 1.0 - keep.astype(jnp.float32).mean()
        return loss, metrics

    return loss_fn


def make_accum_grads_fn(loss_fn):
    """Micro-batch accumulation of the full batch's loss. The image term is a mean over rows, but
    the text term divides by the batch's kept captions, which differ between micro-batches under
    caption dropout: each micro-batch divides by 1/accum of the whole batch's count instead, so the
    mean over micro-batches is the full batch's text term."""

    def accum_grads_fn(params, batch, rng, step, accum):
        keep = batch.get("caption_kept")
        if keep is not None:
            rows = keep.astype(jnp.float32) * batch.get("_mask", jnp.ones_like(keep)).astype(jnp.float32)
            divisor = jnp.maximum(rows.sum(), 1.0) / accum
            batch = dict(batch, _text_divisor=jnp.full(keep.shape, divisor, jnp.float32))
        return mean_over_micro_batches(loss_fn, params, batch, rng, step, accum)

    return accum_grads_fn


def _host_rows(x, n):
    """The first n rows of a (possibly multi-host) global array, as numpy on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))[:n]
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))[:n]


def make_image_fn(cfg, dvae, num_images: int = 8):
    """Samples one image per caption of the first rows of the batch, decoded with the dVAE."""

    def image_fn(params, batch):
        text = _host_rows(batch["text"], 4 * num_images)
        if "caption_kept" in batch:  # sample from real captions, not caption-dropped rows
            kept = _host_rows(batch["caption_kept"], 4 * num_images) > 0
            text = np.concatenate([text[kept], text[~kept]])
        text = text[:num_images]
        tokens = sampling.sample(params, cfg, text, rng=jax.random.key(0))
        tokens = _host_rows(tokens, num_images).reshape(-1, cfg.image_grid, cfg.image_grid)
        return {"samples": image_grid(np.asarray(dvae.decode(tokens)))}

    return image_fn


def make_evaluator(config, cfg, example_fn, batch_fn):
    """Text/image loss and image bits per token over `config.model.eval_max_batches` batches of the
    eval split (no caption dropout)."""

    m = config.model
    weights = dict(text_loss_weight=float(m.text_loss_weight), image_loss_weight=float(m.image_loss_weight))
    max_batches = int(m.eval_max_batches)

    @jax.jit
    def eval_step(params, text, image, mask):
        loss, metrics = model_lib.loss_and_metrics(params, cfg, text, image, row_weight=mask, **weights)
        rows = mask.astype(jnp.float32).sum()
        return jax.tree.map(lambda v: v * rows, dict(metrics, loss=loss)), rows

    def fn(params, step):
        totals, count = None, 0.0
        for b in eval_batches(config, params, example_fn, max_batches=max_batches, batch_fn=batch_fn):
            sums, rows = jax.device_get(eval_step(params, b["text"], b["image_tokens"], b["_mask"]))
            totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
            count += float(rows)
        if not count:
            raise RuntimeError(f"DALL-E evaluator: split {config.data.eval_split!r} gave no examples")
        return {k: float(v) / count for k, v in totals.items()}

    return Evaluator(name=config.data.eval_split, fn=fn)


def check_token_shards(config, cfg: model_lib.DalleConfig) -> None:
    """Pre-encoded shards must match the model's grid and codebook. Their dVAE (index.json's
    `dvae_workdir`) becomes config.dvae_workdir when that is empty, so sample grids, the workdir's
    config.json and `generate` all decode with the dVAE the tokens came from."""
    try:
        index = read_index(str(config.data.data_dir))
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    if (int(index["grid_size"]), int(index["vocab_size"])) != (cfg.image_grid, cfg.image_vocab_size):
        raise ConfigError(
            f"token shards in {config.data.data_dir} are {index['grid_size']}x{index['grid_size']} "
            f"tokens of a {index['vocab_size']}-code dVAE; the model expects {cfg.image_grid}x"
            f"{cfg.image_grid} and {cfg.image_vocab_size} (model.image_grid, model.image_vocab_size)"
        )
    if not str(config.get("dvae_workdir", "") or "") and index.get("dvae_workdir"):
        config.dvae_workdir = str(index["dvae_workdir"])


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
    if os.path.isfile(os.path.join(path, "config.json")):  # else the trainer reports what is missing
        masks.check_trained_masks(config, checkpoint.read_config(path), source)


def make_task(config, workdir: str | None = None):
    """Builds the tokenizer (training one into the workdir if text.merges_file is empty), resolves
    model.text_vocab_size, loads the dVAE (if config.dvae_workdir) and returns the Task."""

    check_trained_masks(config, workdir)
    abstract_only = workdir is None and int(config.model.text_vocab_size) > 0
    tokenizer = None
    if not abstract_only:  # core_jax.aot needs shapes only: no tokenizer, no dVAE
        tokenizer = tokenizer_from_config(config.text, workdir, data_source=config.data.source)
        resolve_text_vocab(config, tokenizer)
    try:
        cfg = model_lib.DalleConfig.from_config(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if config.data.source == "tokens" and not abstract_only:
        check_token_shards(config, cfg)
    dvae = None if abstract_only else load_dvae(config, cfg)
    if dvae is None and config.data.source == "shapes" and not abstract_only:
        raise ConfigError(
            "config.dvae_workdir is empty but the shapes source has no image tokens: "
            "train a dVAE (configs/dvae_shapes.py) and pass --config.dvae_workdir=DIR"
        )
    encode = image_tokens_fn(dvae) if dvae is not None else None
    example_fn = make_example_fn(config, cfg, tokenizer, encode, train=True)
    eval_example_fn = make_example_fn(config, cfg, tokenizer, encode, train=False)

    def init_fn(rng, batch):
        return {"params": model_lib.init_params(cfg, rng)}

    batch_fn = make_batch_fn(cfg, encode)
    evaluators = ()
    if int(config.model.eval_max_batches) != 0 and not abstract_only:
        evaluators = (make_evaluator(config, cfg, eval_example_fn, batch_fn),)

    loss_fn = make_loss_fn(cfg, config.model)

    def batch_spec(batch_size):
        spec = {
            "text": jax.ShapeDtypeStruct((batch_size, cfg.text_len), jnp.int32),
            "image_tokens": jax.ShapeDtypeStruct((batch_size, cfg.num_image_tokens), jnp.int32),
        }
        if caption_dropout(config.model) > 0:
            spec["caption_kept"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
        return spec

    return Task(
        init_fn=init_fn,
        loss_fn=loss_fn,
        accumulation="global",
        accum_grads_fn=make_accum_grads_fn(loss_fn),
        example_fn=example_fn,
        flops_per_example=model_lib.flops_per_example(cfg),
        evaluators=evaluators,
        image_fn=make_image_fn(cfg, dvae) if dvae is not None else None,
        batch_fn=batch_fn,
        batch_spec=batch_spec,
        # generate/sampling rebuild the tokenizer from the workdir (tokenizer_from_config's default)
        extra_files={"tokenizer/merges.txt": tokenizer.path} if tokenizer is not None else {},
    )
