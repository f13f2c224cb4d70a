"""The optax optimizer and learning-rate schedule named by `config.optim`."""

from __future__ import annotations

import jax
import optax

OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(optim_config, total_steps: int):
    peak = float(optim_config.learning_rate)
    warmup = int(min(optim_config.warmup_steps, max(total_steps - 1, 0)))
    end = peak * float(optim_config.end_learning_rate_fraction)
    # The decay (warm-up included) ends after decay_steps, then the rate stays at `end`.
    decay = int(optim_config.get("decay_steps", 0) or 0) or total_steps
    kind = optim_config.schedule
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(decay, warmup + 1), end)
    if kind == "linear":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, peak, warmup),
                optax.linear_schedule(peak, end, max(decay - warmup, 1)),
            ],
            [warmup],
        )
    if kind == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
        )
    raise ValueError(f"optim.schedule: unknown schedule {kind!r} ({', '.join(SCHEDULES)})")


def _decay_mask(params):
    # Decaying norms, biases and temperatures hurts; only matrices (ndim >= 2) are decayed.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_config, total_steps: int):
    """Returns (optax transformation, schedule)."""
    schedule = make_schedule(optim_config, total_steps)
    name = optim_config.name
    if name == "adamw":
        core = optax.adamw(
            schedule,
            b1=optim_config.b1,
            b2=optim_config.b2,
            eps=optim_config.eps,
            weight_decay=optim_config.weight_decay,
            mask=_decay_mask,
        )
    elif name == "adafactor":
        core = optax.adafactor(schedule, weight_decay_rate=optim_config.weight_decay or None)
    elif name == "sgd":
        core = optax.sgd(schedule, momentum=optim_config.b1)
    else:
        raise ValueError(f"optim.name: unknown optimizer {name!r} ({', '.join(OPTIMIZERS)})")
    parts = []
    if optim_config.grad_clip_norm and optim_config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
    parts.append(core)
    return optax.chain(*parts), schedule
