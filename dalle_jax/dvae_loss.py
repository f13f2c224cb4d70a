"""dVAE training objective: gumbel-softmax relaxation, its schedules, reconstruction likelihoods,
the KL to a uniform prior, and codebook metrics. Pure jnp functions, usable under jit.

The loss is the negative ELB of the DALL-E paper, reported per image dimension (H*W*C) so that the
learning rate does not depend on the image size:
    loss = mean_batch( sum_pixels NLL(x | z) + kl_weight * sum_positions KL(q(z|x) || uniform) ) / (H*W*C)
Optionally (`model.usage_weight`, not in the paper) + usage_weight * positions * (log K - H(q_avg)) / (H*W*C),
which penalises only the batch-level part of that KL (see `usage_penalty`). A negative kl_weight
then rewards confident codes at each position: usage_weight = -kl_weight = u adds -u * I(x; code)
per position (info-max); configs/dvae_shapes.py uses this against codebook collapse.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from core_jax.data.image_ops import DVAE_EPS, unmap_pixels
from core_jax.errors import ConfigError

SCHEDULES = ("cosine", "exponential", "linear", "constant")
RECON_LOSSES = ("logit_laplace", "mse")
LOG2 = math.log(2.0)


def schedule_value(kind: str, start: float, end: float, steps: int, step) -> jax.Array:
    """`start` at step 0 to `end` at `steps` (held after). cosine: half-cosine; exponential:
    geometric interpolation (start and end must be > 0); linear; constant (= end)."""
    if kind not in SCHEDULES:
        raise ConfigError(f"unknown schedule {kind!r}; choose one of {SCHEDULES}")
    if kind == "exponential" and (start <= 0 or end <= 0):
        raise ConfigError(
            f"an exponential schedule needs start and end > 0, got {start} -> {end}; "
            f"use cosine or linear to ramp from 0"
        )
    start, end = float(start), float(end)
    if kind == "constant" or steps <= 0:
        return jnp.asarray(end, jnp.float32)
    t = jnp.clip(jnp.asarray(step, jnp.float32) / float(steps), 0.0, 1.0)
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    if kind == "exponential":
        return start * (end / start) ** t
    return start + (end - start) * t


def temperature(model_config, step) -> jax.Array:
    m = model_config
    return schedule_value(
        m.temperature_schedule, m.temperature_start, m.temperature_end, int(m.temperature_anneal_steps), step
    )


def kl_weight(model_config, step) -> jax.Array:
    m = model_config
    return schedule_value(
        m.kl_weight_schedule, m.kl_weight_start, m.kl_weight_end, int(m.kl_weight_ramp_steps), step
    )


def usage_weight(model_config, step) -> jax.Array:
    m = model_config
    start = float(m.get("usage_weight", 0.0))
    kind = str(m.get("usage_weight_schedule", "constant"))
    if kind == "constant":
        return schedule_value("constant", start, start, 0, step)
    return schedule_value(kind, start, float(m.usage_weight_end), int(m.usage_weight_steps), step)


def gumbel_softmax(rng, logits, tau, straight_through=False) -> jax.Array:
    """Relaxed one-hot sample softmax((logits + g) / tau) over the last axis. Straight-through
    returns the hard one-hot in the forward pass with the relaxed sample's gradient;
    `straight_through` may be a traced bool (switched on at a step inside the jitted loss)."""
    g = jax.random.gumbel(rng, logits.shape, jnp.float32)
    soft = jax.nn.softmax((logits.astype(jnp.float32) + g) / tau, axis=-1)
    if straight_through is False:
        return soft
    hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1], dtype=soft.dtype)
    st = hard + soft - jax.lax.stop_gradient(soft)
    return st if straight_through is True else jnp.where(straight_through, st, soft)


def straight_through_now(model_config, step):
    """model.straight_through for the whole run, or from model.straight_through_from_step on (a
    late switch lets the decoder adapt to the hard codes it gets at inference)."""
    m = model_config
    start = int(m.get("straight_through_from_step", -1))
    if bool(m.straight_through) or start == 0:
        return True
    return False if start < 0 else jnp.asarray(step) >= start


def kl_to_uniform(logits) -> jax.Array:
    """KL(softmax(logits) || uniform) per position: sum_k q log q + log K; shape logits.shape[:-1]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(logp) * logp, axis=-1) + math.log(logits.shape[-1])


def logit_laplace_nll(x, stats) -> jax.Array:
    """Per-element NLL of mapped pixels x in (0, 1) under the logit-Laplace distribution with
    location mu = stats[..., :C] (in logit space) and log-scale stats[..., C:]:
        -log p(x) = log(2 b) + log x + log(1 - x) + |logit(x) - mu| / b."""
    c = x.shape[-1]
    if stats.shape[-1] != 2 * c:
        raise ValueError(f"decoder output has {stats.shape[-1]} channels, expected 2 * {c}")
    mu, log_b = stats[..., :c].astype(jnp.float32), stats[..., c:].astype(jnp.float32)
    x = x.astype(jnp.float32)
    logit_x = jnp.log(x) - jnp.log1p(-x)
    return LOG2 + log_b + jnp.log(x) + jnp.log1p(-x) + jnp.abs(logit_x - mu) * jnp.exp(-log_b)


def squared_error(x, stats) -> jax.Array:
    """Per-element squared error of the decoder's mean (sigmoid of the location) in mapped space."""
    c = x.shape[-1]
    return jnp.square(jax.nn.sigmoid(stats[..., :c].astype(jnp.float32)) - x.astype(jnp.float32))


def reconstruct_pixels(stats, channels: int = 3, eps: float = DVAE_EPS) -> jax.Array:
    """Decoder output -> image in [0, 1] (OpenAI: unmap_pixels(sigmoid(location)))."""
    return unmap_pixels(jax.nn.sigmoid(stats[..., :channels].astype(jnp.float32)), eps)


def psnr_per_image(a01, b01) -> jax.Array:
    """PSNR (dB, peak 1.0) of each image pair in [0, 1]; capped at 100 dB for identical images."""
    mse = jnp.mean(jnp.square(a01.astype(jnp.float32) - b01.astype(jnp.float32)), axis=(1, 2, 3))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def code_histogram(logits, mask=None) -> jax.Array:
    """Counts of argmax codes over all positions [vocab] (rows with mask False ignored)."""
    vocab = logits.shape[-1]
    codes = jnp.argmax(logits, axis=-1).reshape(logits.shape[0], -1)
    weights = jnp.ones(codes.shape, jnp.float32)
    if mask is not None:
        weights = weights * mask.astype(jnp.float32)[:, None]
    return jnp.zeros((vocab,), jnp.float32).at[codes.reshape(-1)].add(weights.reshape(-1))


def codebook_metrics(logits) -> dict:
    """perplexity of the batch-average code distribution (mean of softmax over batch and positions;
    equals vocab when every code is equally likely) and the fraction of codes some argmax uses."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    avg = jnp.mean(probs.reshape(-1, logits.shape[-1]), axis=0)
    entropy = -jnp.sum(avg * jnp.log(jnp.maximum(avg, 1e-12)))
    used = jnp.mean((code_histogram(logits) > 0).astype(jnp.float32))
    return {"codebook_perplexity": jnp.exp(entropy), "codebook_used_fraction": used}


def usage_penalty(logits) -> jax.Array:
    """log K - H(q_avg): zero when the batch-average code distribution is uniform. The KL to a
    uniform prior splits into this term plus the mean KL(q || q_avg) (per-position confidence);
    weighting this part alone fights codebook collapse without blurring each position's code."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    avg = jnp.mean(probs.reshape(-1, logits.shape[-1]), axis=0)
    return math.log(logits.shape[-1]) + jnp.sum(avg * jnp.log(jnp.maximum(avg, 1e-12)))


def dvae_objective(x, logits, stats, *, kl_w, recon_loss: str = "logit_laplace", usage_w=0.0):
    """(loss, metrics) for mapped images x [B,H,W,C], encoder logits and decoder stats."""
    if recon_loss not in RECON_LOSSES:
        raise ConfigError(f"model.recon_loss must be one of {RECON_LOSSES}, got {recon_loss!r}")
    dims = x.shape[1] * x.shape[2] * x.shape[3]
    per_elem = logit_laplace_nll(x, stats) if recon_loss == "logit_laplace" else squared_error(x, stats)
    recon = jnp.sum(per_elem, axis=(1, 2, 3))  # per image
    kl = jnp.sum(kl_to_uniform(logits), axis=(1, 2))  # per image
    positions = logits.shape[1] * logits.shape[2]
    usage = usage_penalty(logits)
    loss = (jnp.mean(recon + kl_w * kl) + usage_w * positions * usage) / dims
    rec01 = reconstruct_pixels(stats, x.shape[-1])
    orig01 = unmap_pixels(x.astype(jnp.float32))
    mse01 = jnp.mean(jnp.square(rec01 - orig01))
    metrics = {
        "recon_loss": jnp.mean(recon) / dims,
        "kl": jnp.mean(kl) / positions,
        "usage_penalty": usage,
        "mse": mse01,
        "psnr": jnp.mean(psnr_per_image(rec01, orig01)),
    }
    return loss, metrics
