"""The dVAE as a `core_jax.trainer.Task`: preprocessing, loss, evaluator and reconstruction grids."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from core_jax import sharding
from core_jax.data import image_ops
from core_jax.errors import ConfigError
from core_jax.finetune import frozen_prefixes
from core_jax.metrics import image_grid
from core_jax.trainer import Evaluator, Task, eval_batches
from dalle_jax import dvae as dvae_lib
from dalle_jax import dvae_loss, dvae_models

CODES_ACT = ("act_batch", "act_height", "act_width", "act_vocab")


def _replicated(x):
    """Inside a mesh, gathers x everywhere so the host can read it in any process (no-op outside)."""
    return sharding.constrain(x, (None,) * x.ndim)


def preprocess(
    raw_image: np.ndarray,
    image_size: int,
    *,
    random_crop=False,
    random_flip=False,
    rng=None,
    resize_range=(1.0, 1.0),
) -> np.ndarray:
    """uint8 [H, W, 3] -> mapped float32 [size, size, 3] in [eps, 1 - eps]."""
    img = image_ops.resize_and_crop(
        np.asarray(raw_image), image_size, random_crop=random_crop, rng=rng, resize_range=resize_range
    )
    if random_flip:
        img = image_ops.maybe_flip(img, rng)
    return image_ops.dvae_map_pixels(img)


def model_from_config(config) -> dvae_lib.DVAE:
    return dvae_models.make_dvae(
        config.model, config.get("compute_dtype", "float32"), config.get("remat", "none")
    )


def reconstruct_fn(model):
    """(params, mapped images) -> (codes int32 [B,h,w], reconstruction float [0,1], logits)."""

    def fn(params, images):
        logits = model.apply({"params": params}, images, method=dvae_lib.DVAE.encode)
        codes = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        stats = model.apply({"params": params}, codes, method=dvae_lib.DVAE.decode)
        return codes, dvae_loss.reconstruct_pixels(stats, images.shape[-1]), logits

    return fn


def to_uint8(x01):
    return jnp.round(jnp.clip(x01, 0.0, 1.0) * 255.0).astype(jnp.uint8)


TRAIN_CODES = ("relaxed", "argmax")


def train_codes(model_config) -> str:
    kind = str(model_config.get("train_codes", "relaxed"))
    if kind not in TRAIN_CODES:
        raise ConfigError(f"model.train_codes must be one of {TRAIN_CODES}, got {kind!r}")
    return kind


def check_decoder_finetune(config) -> None:
    """model.train_codes='argmax' gives the encoder no gradient: it only makes sense on a trained
    dVAE's params with the encoder frozen (so the tokens stay the ones its transformer learned)."""

    if train_codes(config.model) != "argmax":
        return
    if "encoder" not in frozen_prefixes(config):
        raise ConfigError(
            "model.train_codes='argmax' trains only the decoder: set --config.frozen=encoder "
            "(otherwise the optimizer would still move the encoder)"
        )
    if not str(config.get("init_from", "") or ""):
        raise ConfigError(
            "model.train_codes='argmax' fine-tunes the decoder of a trained dVAE: set "
            "--config.init_from=<its workdir>"
        )


def usage_penalty_on(model_config) -> bool:
    """Whether the usage penalty has a non-zero weight at some step (decoder fine-tuning drops it)."""
    m = model_config
    if train_codes(m) == "argmax":
        return False
    end = m.get("usage_weight_end", 0.0) if m.get("usage_weight_schedule", "constant") != "constant" else 0.0
    return float(m.get("usage_weight", 0.0)) != 0.0 or float(end) != 0.0


def make_loss_fn(model, model_config):
    m = model_config
    if m.recon_loss not in dvae_loss.RECON_LOSSES:
        raise ConfigError(f"model.recon_loss must be one of {dvae_loss.RECON_LOSSES}, got {m.recon_loss!r}")
    # Validate the schedules once, on the host, so a bad config fails before compiling.
    dvae_loss.temperature(m, 0)
    dvae_loss.kl_weight(m, 0)
    dvae_loss.usage_weight(m, 0)

    argmax_codes = train_codes(m) == "argmax"

    def loss_fn(params, batch, rng, step):
        x = batch["image"]
        logits = model.apply({"params": params}, x, method=dvae_lib.DVAE.encode)
        tau = dvae_loss.temperature(m, step)
        beta = dvae_loss.kl_weight(m, step)
        usage_w = dvae_loss.usage_weight(m, step)
        if argmax_codes:
            # Decoder fine-tuning: the codes inference uses, nothing for the (frozen) encoder.
            logits = jax.lax.stop_gradient(logits)
            z = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
            beta, usage_w = jnp.zeros_like(beta), jnp.zeros_like(usage_w)
        else:
            z = dvae_loss.gumbel_softmax(rng, logits, tau, dvae_loss.straight_through_now(m, step))
        z = sharding.constrain(z, CODES_ACT)
        stats = model.apply({"params": params}, z, method=dvae_lib.DVAE.decode)
        loss, metrics = dvae_loss.dvae_objective(
            x, logits, stats, kl_w=beta, recon_loss=m.recon_loss, usage_w=usage_w
        )
        metrics.update(dvae_loss.codebook_metrics(logits))
        metrics.update(temperature=tau, kl_weight=beta, usage_weight=usage_w)
        return loss, metrics

    return loss_fn


def make_image_fn(model, num_images: int = 8):
    recon = reconstruct_fn(model)

    @functools.partial(jax.jit, static_argnums=2)
    def pair(params, images, n):
        images = images[:n]
        _, rec, _ = recon(params, images)
        orig = image_ops.unmap_pixels(images.astype(jnp.float32))
        return _replicated(to_uint8(orig)), _replicated(to_uint8(rec))

    def image_fn(params, batch):
        n = min(num_images, batch["image"].shape[0])
        orig, rec = jax.device_get(pair(params, batch["image"], n))
        # Row 1: originals; row 2: their reconstructions from argmax codes.
        return {"reconstructions": image_grid(np.concatenate([orig, rec]), rows=2)}

    return image_fn


def make_eval_step(model):
    recon = reconstruct_fn(model)

    @jax.jit
    def step(params, images, mask):
        _, rec, logits = recon(params, images)
        orig = image_ops.unmap_pixels(images.astype(jnp.float32))
        m = mask.astype(jnp.float32)
        psnr = dvae_loss.psnr_per_image(rec, orig)
        mse = jnp.mean(jnp.square(rec - orig), axis=(1, 2, 3))
        out = {
            "psnr_sum": jnp.sum(psnr * m),
            "mse_sum": jnp.sum(mse * m),
            "count": jnp.sum(m),
            "histogram": dvae_loss.code_histogram(logits, mask),
        }
        return jax.tree.map(_replicated, out)

    return step


def make_evaluator(config, model, example_fn):
    """PSNR over the eval split (argmax codes, as at inference) and codebook usage: the count of
    codes no position of the whole pass picked (`dead_codes`) and the fraction used; an
    experiment's own metrics of the code histogram (`dvae_models.experiment`) beside them."""

    step_fn = make_eval_step(model)
    max_batches = int(config.model.get("eval_max_batches", -1))
    variant = dvae_models.experiment(config.model)

    def fn(params, step):
        totals = None
        for batch in eval_batches(config, params, example_fn, max_batches=max_batches):
            out = jax.device_get(step_fn(params, batch["image"], batch["_mask"]))
            totals = out if totals is None else jax.tree.map(np.add, totals, out)
        if totals is None or totals["count"] == 0:
            raise RuntimeError(f"dVAE evaluator: split {config.data.eval_split!r} gave no examples")
        count, hist = float(totals["count"]), np.asarray(totals["histogram"])
        p = hist / hist.sum()
        used = int((hist > 0).sum())
        out = {
            "psnr": float(totals["psnr_sum"]) / count,
            "mse": float(totals["mse_sum"]) / count,
            "dead_codes": float(hist.size - used),
            "codebook_used_fraction": used / hist.size,
            "codebook_perplexity": float(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0])))),
            "examples": count,
        }
        if variant is not None:
            out.update(variant.eval_metrics(config.model, hist))
        return out

    return Evaluator(name=config.data.eval_split, fn=fn)


def make_task(config, workdir=None):
    check_decoder_finetune(config)
    model = model_from_config(config)
    size = int(config.data.image_size)
    try:  # a clear error now if the pools do not divide the size
        dvae_lib.grid_size(config.model, size)
    except ValueError as e:
        raise ConfigError(f"config.data.image_size: {e}") from None

    resize_range = tuple(config.data.get("random_resize_range", (1.0, 1.0)))

    def example_fn(raw, rng):
        return {
            "image": preprocess(
                raw["image"],
                size,
                random_crop=bool(config.data.random_crop),
                random_flip=bool(config.data.random_flip),
                rng=rng,
                resize_range=resize_range,
            )
        }

    def eval_example_fn(raw, rng):
        return {"image": preprocess(raw["image"], size)}

    def init_fn(rng, batch):
        return model.init(rng, batch["image"])

    enc, dec = dvae_models.forward_flops(config.model, size, soft_codes=True)
    abstract_only = workdir is None  # core_jax.aot: shapes only, no evaluator data

    def batch_spec(batch_size):
        return {"image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32)}

    return Task(
        init_fn=init_fn,
        loss_fn=make_loss_fn(model, config.model),
        example_fn=example_fn,
        # forward + backward (2x forward); decoder fine-tuning runs the encoder forward only
        flops_per_example=(enc if train_codes(config.model) == "argmax" else 3.0 * enc) + 3.0 * dec,
        evaluators=() if abstract_only else (make_evaluator(config, model, eval_example_fn),),
        image_fn=make_image_fn(model),
        batch_spec=batch_spec,
        # Reconstruction and KL are means over images, so micro-batches accumulate them exactly;
        # the usage penalty is a function of the whole batch's average code distribution.
        accumulation="refuse" if usage_penalty_on(config.model) else "mean",
        accumulation_blocker="model.usage_weight: the codebook usage penalty is a function of the "
        "whole batch's average code distribution",
    )
