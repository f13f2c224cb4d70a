"""Orbax checkpoints of the train state plus the data iterator position; params-only loading."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from core_jax.config import from_json_file, to_json

CHECKPOINT_DIR = "checkpoints"


def _register_array_handler():
    # Replica-parallel saving slices every replicated array with a freshly compiled op per shape:
    # worth it for large arrays on a pod, pure overhead (seconds per save) for small ones.
    handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=16 * 2**20)
    # orbax warns on every override, this deliberate one included; said at import time, that
    # warning would precede a command's one-line `error:` (now that commands import this at load).
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_logging.set_verbosity(level)


_register_array_handler()


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir) if "://" not in workdir else workdir, CHECKPOINT_DIR)


def make_manager(workdir: str, *, keep: int | None, save_interval_steps: int = 1) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=save_interval_steps,
        create=True,
        enable_async_checkpointing=True,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(
    manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict | None, force: bool = False
) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    items["data"] = ocp.args.JsonSave(data_state or {})
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any):
    """Restores onto `abstract_state`'s shardings (so a different mesh reshards on load)."""
    restored = manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
    )
    return restored["state"], restored["data"]


def write_config(workdir: str, config) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(to_json(config))


def read_config(workdir: str):
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{workdir} holds no config.json: not a workdir written by a trainer or converter"
        )
    return from_json_file(path)


def save_params(workdir: str, config, params: Any, step: int = 0) -> None:
    """Writes a workdir that every command loads like a trained one (used by weight converters).

    Only params are stored; a trainer started on this workdir with `init_from` style fine-tuning
    would build a fresh optimizer state.
    """
    write_config(workdir, config)
    params = jax.tree.map(np.asarray, params)
    with ocp.CheckpointManager(
        checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(create=True)
    ) as manager:
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params}), data=ocp.args.JsonSave({"converted": True})
            ),
            force=True,
        )
        manager.wait_until_finished()


def latest_step(workdir: str) -> int | None:
    d = checkpoint_dir(workdir)
    if not os.path.isdir(d):
        return None
    with ocp.CheckpointManager(d) as manager:
        return manager.latest_step()


def _params_reader(workdir: str) -> ocp.CheckpointManager:
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(checkpoint_dir(workdir), item_handlers=handlers)


def _params_metadata(manager, workdir: str, step: int | None, key: str = "params"):
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir} holds no checkpoint under {checkpoint_dir(workdir)}")
    return step, manager.metadata(step).item_metadata["state"][key]


def param_shapes(workdir: str, step: int | None = None) -> Any:
    """The params tree of the newest (or given) checkpoint with each array's shape, read from the
    checkpoint's metadata (no array is loaded)."""
    with _params_reader(workdir) as manager:
        _, meta = _params_metadata(manager, workdir, step)
    return jax.tree.map(lambda m: tuple(m.shape), meta, is_leaf=lambda m: hasattr(m, "shape"))


def _state_keys(manager, step) -> set:
    """Top-level keys of the train state saved at `step` (needs a manager from _params_reader)."""
    meta = manager.metadata(step).item_metadata["state"]
    return set(meta.keys()) if hasattr(meta, "keys") else set()


def _has_ema(manager, step) -> bool:
    return "ema" in _state_keys(manager, step)


def workdir_has_ema(workdir: str, step: int | None = None) -> bool:
    """Whether the newest (or given) checkpoint of `workdir` holds an EMA of the weights
    (trained with config.ema_decay > 0)."""
    with _params_reader(workdir) as manager:
        step = manager.latest_step() if step is None else step
        return step is not None and _has_ema(manager, step)


def load_params(workdir: str, step: int | None = None, shardings: Any = None, *, ema: bool = True):
    """(config, params) of the newest (or given) checkpoint in `workdir`, for inference.

    Reads one subtree of the saved state: the EMA of the weights when the run kept one
    (config.ema_decay > 0) and `ema` is True, else the raw `params` (`ema=False`, the CLIs'
    --raw_weights). With `shardings` (a tree matching params) the arrays are placed that way;
    otherwise they land on the default device.
    """
    config = read_config(workdir)
    with _params_reader(workdir) as manager:
        step = manager.latest_step() if step is None else step
        key = "ema" if ema and step is not None and _has_ema(manager, step) else "params"
        step, params_meta = _params_metadata(manager, workdir, step, key)
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), params_meta
            )
        else:
            target = jax.tree.map(
                lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), params_meta, shardings
            )
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={key: target},
                    restore_args=jax.tree.map(
                        lambda t: ocp.ArrayRestoreArgs(
                            sharding=t.sharding, global_shape=t.shape, dtype=t.dtype
                        ),
                        {key: target},
                    ),
                    partial_restore=True,
                )
            ),
        )
    return config, restored["state"][key]


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
