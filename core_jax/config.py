"""The keys every trainer understands, and the checks run before anything compiles."""

from __future__ import annotations

import json
import os

import ml_collections

from core_jax import storage
from core_jax.data import default_data_config

# ConfigError lives in the leaf core_jax.errors (importable from anywhere without a circle);
# `from core_jax.config import ConfigError` keeps working.
from core_jax.errors import ConfigError
from core_jax.modeling import REMAT_POLICIES
from core_jax.optim import OPTIMIZERS, SCHEDULES
from core_jax.sharding import MESH_AXES, mesh_shape
from core_jax import wandb_log


def base_config() -> ml_collections.ConfigDict:
    """Keys shared by the dVAE, DALL-E and CLIP trainers. Model configs add `model` (and more)."""

    c = ml_collections.ConfigDict()
    # Module whose make_task(config, workdir) builds the Task (used by core_jax.aot).
    c.task = ""
    c.total_steps = 1000
    c.batch_size = 32  # global, across all processes
    c.seed = 0
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.log_every = 50
    c.eval_every = 500
    c.compute_dtype = "float32"  # or bfloat16; params stay float32
    c.grad_accum_steps = 1
    c.remat = "none"  # none | full | dots | dots_no_batch
    c.scan_layers = True
    # Layers per iteration of the scan's loop (lax.scan's `unroll`); >= the layer count unrolls the
    # whole stack: the same params (and init) as the scan, without the loop, whose stacking of every
    # layer's saved activations costs a small model's CPU step 10-22%. Compile time grows with it.
    c.scan_unroll = 1
    c.nan_policy = "skip"  # skip: drop the update and count it; abort: stop the run
    # Under nan_policy='skip', this many non-finite steps in a row stop the run (0: never): a
    # skipped step leaves the params as they were, so once the params themselves give a
    # non-finite loss every later step is skipped too and the run would idle to its end.
    c.max_consecutive_nonfinite = 10
    # Fine-tuning (core_jax/finetune.py): a fresh run starts from the params of this workdir's
    # newest checkpoint; `frozen` (comma list of param-path prefixes, e.g. "encoder") get no updates.
    c.init_from = ""
    c.frozen = ""
    # EMA of the weights (exponentially weighted iterate averaging): 0 = off. With decay d > 0 the
    # train state also holds ema <- d * ema + (1 - d) * params after every update (starting from
    # the initial params); checkpoints save it and every inference loader prefers it (docs/architecture.md).
    c.ema_decay = 0.0
    # True: decay min(ema_decay, (1 + t) / (10 + t)) at update t = 0, 1, ..., the num_updates
    # convention of TensorFlow's tf.train.ExponentialMovingAverage, so the EMA follows the fast
    # early changes of the weights instead of staying near their random init.
    c.ema_warmup = False
    # Which weights `init_from` starts from: that workdir's EMA when it has one, else its params;
    # True: always its raw (non-averaged) params.
    c.init_from_raw_weights = False
    # decay_steps: steps (warm-up included) over which the rate decays to
    # learning_rate * end_learning_rate_fraction and then stays there; 0 = total_steps.
    c.optim = ml_collections.ConfigDict(
        dict(
            name="adamw",
            learning_rate=3e-4,
            schedule="cosine",
            warmup_steps=100,
            end_learning_rate_fraction=0.0,
            decay_steps=0,
            weight_decay=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            grad_clip_norm=1.0,
        )
    )
    c.data = default_data_config()
    c.model = ml_collections.ConfigDict()
    # Optional W&B logging from process 0, beside metrics.jsonl (core_jax/wandb_log.py).
    c.wandb = wandb_log.default_config()
    return c


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Locked configs turn a typo'd override into an error instead of a silently new key."""
    config.lock()
    return config


def validate(config, num_devices: int, process_count: int = 1) -> None:
    """Raises ConfigError with one clear sentence for the first problem found."""

    for key in (
        "total_steps",
        "batch_size",
        "log_every",
        "checkpoint_every",
        "eval_every",
        "keep_checkpoints",
        "grad_accum_steps",
    ):
        if key in config and int(config[key]) <= 0:
            raise ConfigError(f"config.{key} must be positive, got {config[key]}")
    try:
        shape = mesh_shape(config.mesh, num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dp = dict(zip(MESH_AXES, shape))
    data_parallel = dp["data"] * dp["fsdp"]
    if config.batch_size % data_parallel:
        raise ConfigError(
            f"config.batch_size={config.batch_size} is not divisible by the data-parallel size "
            f"mesh.data*mesh.fsdp={data_parallel}"
        )
    if config.batch_size % process_count:
        raise ConfigError(
            f"config.batch_size={config.batch_size} is not divisible by the "
            f"number of processes {process_count}"
        )
    micro = config.batch_size // config.grad_accum_steps
    if config.batch_size % config.grad_accum_steps or micro % data_parallel:
        raise ConfigError(
            f"config.batch_size={config.batch_size} / grad_accum_steps={config.grad_accum_steps} "
            f"must give a micro-batch divisible by mesh.data*mesh.fsdp={data_parallel}"
        )
    # 0 is allowed: the unCLIP stages take the size from the CLIP they condition on.
    if "data" in config and "image_size" in config.data and int(config.data.image_size) < 0:
        raise ConfigError(f"config.data.image_size must be >= 0, got {config.data.image_size}")
    if config.nan_policy not in ("skip", "abort"):
        raise ConfigError(f"config.nan_policy must be 'skip' or 'abort', got {config.nan_policy!r}")
    if int(config.get("max_consecutive_nonfinite", 0)) < 0:
        raise ConfigError(
            f"config.max_consecutive_nonfinite must be >= 0 (0 = never stop), got {config.max_consecutive_nonfinite}"
        )
    if config.compute_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"config.compute_dtype must be float32 or bfloat16, got {config.compute_dtype!r}")
    for key, known in (("name", OPTIMIZERS), ("schedule", SCHEDULES)):
        if key in config.optim and config.optim[key] not in known:
            raise ConfigError(
                f"config.optim.{key} must be one of {', '.join(known)}, got {config.optim[key]!r}"
            )
    if int(config.optim.get("decay_steps", 0) or 0) < 0:
        raise ConfigError(
            f"config.optim.decay_steps must be >= 0 (0 = total_steps), got {config.optim.decay_steps}"
        )
    ema_decay = float(config.get("ema_decay", 0.0))
    if not 0.0 <= ema_decay < 1.0:
        raise ConfigError(
            f"config.ema_decay must be in [0, 1) (0 = no EMA of the weights, e.g. "
            f"0.999), got {config.ema_decay}"
        )
    resize_range = tuple(config.data.get("random_resize_range", (1.0, 1.0)))
    if len(resize_range) != 2 or not 1.0 <= float(resize_range[0]) <= float(resize_range[1]):
        raise ConfigError(
            f"config.data.random_resize_range must be (lo, hi) with 1 <= lo <= hi "
            f"(multiples of image_size, e.g. (1.125, 1.5)), got {resize_range}"
        )
    if int(config.get("scan_unroll", 1)) < 1:
        raise ConfigError(
            f"config.scan_unroll must be >= 1 (layers per scan iteration), got {config.scan_unroll}"
        )
    if config.remat not in REMAT_POLICIES:
        raise ConfigError(f"config.remat must be one of {REMAT_POLICIES}, got {config.remat!r}")
    check_paths(config)
    wandb_log.check(config)


# Keys (dotted) that name a file or directory which must exist when set.
PATH_KEYS = (
    "data.index_file",
    "data.data_dir",
    "dvae_workdir",
    "clip_workdir",
    "text.merges_file",
    "init_from",
)


def _get(config, dotted):
    node = config
    for part in dotted.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


def check_paths(config) -> None:
    for key in PATH_KEYS:
        value = _get(config, key)
        if not value or not isinstance(value, str) or value == "open_clip":
            continue
        if storage.is_remote(value):  # its bucket at least: listing a prefix costs a request each
            storage.check_reachable(value)
            continue
        if not os.path.exists(value):
            raise ConfigError(f"config.{key}: path does not exist: {value}")


def to_json(config) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def from_json_file(path: str) -> ml_collections.ConfigDict:
    with storage.open(path) as f:
        return ml_collections.ConfigDict(json.load(f))
