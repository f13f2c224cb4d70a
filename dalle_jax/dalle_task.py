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

import jax
import jax.numpy as jnp
import numpy as np

from core_jax.data import image_ops
from core_jax.data.decode import example_caption
from core_jax.metrics import image_grid
from core_jax.sharded_inference import gather
from core_jax.trainer import Evaluator, Task, eval_batches, mean_over_micro_batches
from dalle_jax import sampling
from dalle_jax import transformer as model_lib
from dalle_jax.run_config import DalleRun, resolve_run


def image_tokens_fn(dvae):
    """uint8 images [B, H, W, 3] -> int32 [B, grid*grid] with `dvae.encode` (jitted inside the
    dVAE API), run on the host once per batch."""

    def encode(images: np.ndarray) -> np.ndarray:
        tokens = np.asarray(dvae.encode(np.asarray(images)))
        return tokens.reshape(tokens.shape[0], -1).astype(np.int32)

    return encode


def make_example_fn(run: DalleRun, encode, *, train: bool):
    """Raw example -> {'text', 'image' (uint8, tokenized per batch by batch_fn) or 'image_tokens'}
    (+ 'caption_kept' when training drops captions); `train` picks a random caption and crop and
    applies caption and BPE dropout."""
    config, cfg = run.config, run.cfg
    tokenizer = run.train_tokenizer if train else run.tokenizer
    size = int(config.data.image_size)
    random_crop = train and bool(config.data.random_crop)
    resize_range = tuple(config.data.get("random_resize_range", (1.0, 1.0)))
    # No random flips: captions name left and right ("a circle to the left of ...").

    dropout = run.caption_dropout if train else 0.0
    pads = np.asarray(model_lib.unconditional_text(cfg, 1), np.int32)[0]

    def example_fn(raw, rng):
        caption = example_caption(raw, rng, train)
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


def make_batch_loss(run: DalleRun):
    """(params, text, image_tokens, **row weights) -> (loss, metrics): the model's text + image
    cross-entropy weighted by model.text_loss_weight / image_loss_weight, for training and
    evaluation alike (row weights: `transformer.loss_and_metrics`'s)."""

    def batch_loss(params, text, image_tokens, **rows):
        return model_lib.loss_and_metrics(
            params,
            run.cfg,
            text,
            image_tokens,
            text_loss_weight=run.text_loss_weight,
            image_loss_weight=run.image_loss_weight,
            **rows,
        )

    return batch_loss


def make_loss_fn(batch_loss):
    """The train loss. Caption-dropped rows (`caption_kept` = 0, set by example_fn) already hold
    the all-pad text and leave the text term."""

    def loss_fn(params, batch, rng, step):
        keep = batch.get("caption_kept")
        divisor = batch.get("_text_divisor")  # set by accum_grads_fn, the same in every row
        loss, metrics = batch_loss(
            params,
            batch["text"],
            batch["image_tokens"],
            text_row_weight=keep,
            row_weight=batch.get("_mask"),
            text_divisor=None if divisor is None else divisor[0],
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


def make_image_fn(cfg, dvae, num_images: int = 8):
    """Samples one image per caption of the first rows of the batch, decoded with the dVAE."""

    def image_fn(params, batch):
        text = gather(batch["text"])[: 4 * num_images]
        if "caption_kept" in batch:  # sample from real captions, not caption-dropped rows
            kept = gather(batch["caption_kept"])[: 4 * num_images] > 0
            text = np.concatenate([text[kept], text[~kept]])
        text = text[:num_images]
        tokens = sampling.sample(params, cfg, text, rng=jax.random.key(0))
        tokens = gather(tokens)[:num_images].reshape(-1, cfg.image_grid, cfg.image_grid)
        return {"samples": image_grid(np.asarray(dvae.decode(tokens)))}

    return image_fn


def make_evaluator(run: DalleRun, batch_loss, example_fn, batch_fn):
    """Text/image loss and image bits per token over `config.model.eval_max_batches` batches of the
    eval split (no caption dropout)."""

    config = run.config

    @jax.jit
    def eval_step(params, text, image, mask):
        loss, metrics = batch_loss(params, text, image, row_weight=mask)
        rows = mask.astype(jnp.float32).sum()
        return jax.tree.map(lambda v: v * rows, dict(metrics, loss=loss)), rows

    def fn(params, step):
        totals, count = None, 0.0
        for b in eval_batches(
            config, params, example_fn, max_batches=run.eval_max_batches, batch_fn=batch_fn
        ):
            sums, rows = jax.device_get(eval_step(params, b["text"], b["image_tokens"], b["_mask"]))
            totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
            count += float(rows)
        if not count:
            raise RuntimeError(f"DALL-E evaluator: split {config.data.eval_split!r} gave no examples")
        return {k: float(v) / count for k, v in totals.items()}

    return Evaluator(name=config.data.eval_split, fn=fn)


def make_task(config, workdir: str | None = None) -> Task:
    """The Task of `resolve_run(config, workdir)` (which trains the tokenizer into the workdir if
    text.merges_file is empty and loads the dVAE); config.json records the run's resolved config."""

    run = resolve_run(config, workdir)
    cfg, dvae = run.cfg, run.dvae
    encode = image_tokens_fn(dvae) if dvae is not None else None
    batch_fn = make_batch_fn(cfg, encode)
    batch_loss = make_batch_loss(run)
    loss_fn = make_loss_fn(batch_loss)
    evaluators = ()
    if run.eval_max_batches != 0 and not run.abstract:
        eval_example_fn = make_example_fn(run, encode, train=False)
        evaluators = (make_evaluator(run, batch_loss, eval_example_fn, batch_fn),)

    def init_fn(rng, batch):
        return {"params": model_lib.init_params(cfg, rng)}

    def batch_spec(batch_size):
        spec = {
            "text": jax.ShapeDtypeStruct((batch_size, cfg.text_len), jnp.int32),
            "image_tokens": jax.ShapeDtypeStruct((batch_size, cfg.num_image_tokens), jnp.int32),
        }
        if run.caption_dropout > 0:
            spec["caption_kept"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
        return spec

    return Task(
        init_fn=init_fn,
        loss_fn=loss_fn,
        accumulation="global",
        accum_grads_fn=make_accum_grads_fn(loss_fn),
        example_fn=make_example_fn(run, encode, train=True),
        flops_per_example=model_lib.flops_per_example(cfg),
        evaluators=evaluators,
        image_fn=make_image_fn(cfg, dvae) if dvae is not None else None,
        batch_fn=batch_fn,
        batch_spec=batch_spec,
        decode_step=lambda rows: sampling.decode_step(cfg, rows),
        # generate/sampling rebuild the tokenizer from the workdir (tokenizer_from_config's default)
        extra_files={} if run.abstract else {"tokenizer/merges.txt": run.tokenizer.path},
        config=run.config,
    )
