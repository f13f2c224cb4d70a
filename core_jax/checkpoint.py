"""Orbax checkpoints of the train state plus the data iterator position; params-only loading.

Each training checkpoint also holds a fingerprint of every array of the state (`fingerprint`),
checked when it is restored: orbax reads back bytes that changed on disk without complaint when
they still decode, and the fingerprint turns that silent corruption into a damaged checkpoint
(`damage`, `DamagedCheckpoint`), which the trainer skips for the newest intact one.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from jax.experimental import multihost_utils

from core_jax import storage
from core_jax.config import from_json_file, to_json
from core_jax.errors import ConfigError, RunError, write_error

CHECKPOINT_DIR = "checkpoints"
# Where the trainer moves checkpoints it found damaged: out of orbax's sight (its max_to_keep
# cleanup and a new save of the same step), kept for a person to inspect.
DAMAGED_DIR = "damaged_checkpoints"
# Orbax writes it into a step's folder as the last act of a save (then renames the folder on a
# local disk): a step folder without it was never completely written.
COMMIT_MARKER = "commit_success.txt"


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
    return storage.join(storage.absolute(workdir), CHECKPOINT_DIR)


# Orbax writes arrays through tensorstore's gcs driver for gs:// and its file driver for every
# other path: an s3:// (or other URL) checkpoint folder would fail at the first save.
CHECKPOINT_PROTOCOLS = ("file", "gs")


def check_workdir(workdir: str) -> None:
    """Raises a one-line ConfigError for a workdir that cannot hold checkpoints: an unreachable
    bucket, a missing filesystem extra, or a URL scheme orbax does not write arrays to."""
    storage.check_reachable(workdir)
    scheme = storage.protocol(workdir)
    if scheme not in CHECKPOINT_PROTOCOLS:
        raise ConfigError(
            f"--workdir {workdir}: orbax-checkpoint {ocp.__version__} saves checkpoints to local paths "
            f"and gs:// only, not {scheme}://; data, eval and output paths may be {scheme}:// URLs"
        )


def make_manager(workdir: str, *, keep: int | None, save_interval_steps: int = 1) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=save_interval_steps,
        create=True,
        enable_async_checkpointing=True,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


class DamagedCheckpoint(Exception):
    """A checkpoint whose bytes cannot be trusted; `reason` says what is wrong, in a few words."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint {step}: {reason}")
        self.step, self.reason = step, reason


def _leaf_fingerprint(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)  # 8-byte types: a last axis of 2
    flat_index = jnp.zeros(bits.shape, jnp.uint32)
    for axis, size in enumerate(bits.shape):
        flat_index = flat_index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
    # Sum of bits x an odd weight per position, mod 2^32: any single changed element changes it,
    # and integer sums are exact in any order, so the value does not depend on the sharding.
    return jnp.sum(bits * (2 * flat_index + 1), dtype=jnp.uint32)


# One small program per leaf shape, dtype and sharding, not one over the whole tree: a state's
# leaves share few shapes (params, Adam's two moments and the EMA copy are alike), and a program
# over hundreds of leaves took seconds to compile for every new model.
_leaf_fingerprint_jit = jax.jit(_leaf_fingerprint)


def _path(keys) -> str:
    return jax.tree_util.keystr(keys, simple=True, separator="/")


def fingerprint(tree: Any) -> dict[str, int]:
    """{leaf path: a 32-bit checksum of the leaf's bytes}, computed where the arrays live (a
    collective in a multi-process run: call it on every process)."""
    sums = [(keys, _leaf_fingerprint_jit(x)) for keys, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
    # Replicated scalars: every process holds the value, even where the array spans processes.
    return {_path(keys): int(np.asarray(x.addressable_data(0))) for keys, x in sums}


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_FAILED_PATH = re.compile(r'(?:Failed writing|local file):? "([^"]+)"')


def _write_failure(e: BaseException, where: str) -> RunError | None:
    """A one-line RunError for an exception that a refused write raised (OSError, or tensorstore's
    error carrying the OS error code); None for anything else (a bug, to keep its traceback)."""
    if isinstance(e, OSError) and e.errno is not None:
        return write_error(e.filename or where, e.errno)
    code = _OS_ERROR_CODE.search(str(e))
    if code is None:
        return None
    path = _FAILED_PATH.search(str(e))
    return write_error(path.group(1) if path else where, int(code.group(1)))


def save(
    manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict | None, force: bool = False
) -> bool:
    """Starts saving `state` and `data_state` as checkpoint `step` (orbax finishes in the
    background). A refused write, of this save or of the one before it, raises a one-line RunError."""
    items = {
        "state": ocp.args.StandardSave(state),
        "data": ocp.args.JsonSave(data_state or {}),
        "fingerprint": ocp.args.JsonSave(fingerprint(state)),
    }
    try:
        return manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:
        failure = _write_failure(e, str(manager.directory))
        if failure is None:
            raise
        raise failure from None


class _QuietRefusedWrites(logging.Filter):
    """Orbax logs the exception of a failed background save with its traceback, then raises it
    again where the trainer waits for the save: a refused write becomes one `error:` line there,
    which that traceback would only bury. Every other exception is logged as orbax logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or _write_failure(error, "") is None


absl_logging.get_absl_logger().addFilter(_QuietRefusedWrites())


def wait_until_saved(manager: ocp.CheckpointManager) -> None:
    """Waits for the save in flight; a refused write raises a one-line RunError."""
    try:
        manager.wait_until_finished()
    except Exception as e:
        failure = _write_failure(e, str(manager.directory))
        if failure is None:
            raise
        raise failure from None


def _step_path(workdir: str, step: int) -> epath.Path:
    return epath.Path(checkpoint_dir(workdir)) / str(step)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any):
    """Restores onto `abstract_state`'s shardings (so a different mesh reshards on load).

    Raises DamagedCheckpoint when the bytes are bad: a read fails although the checkpoint lists
    exactly the arrays of `abstract_state`, or an array does not match the fingerprint saved
    with it (checkpoints written before fingerprints existed are not compared). Any other failure
    (a config that changed the state's layout) is raised as orbax raised it."""
    items = {"state": ocp.args.StandardRestore(abstract_state), "data": ocp.args.JsonRestore()}
    checked = (epath.Path(manager.directory) / str(step) / "fingerprint").exists()
    if checked:
        items["fingerprint"] = ocp.args.JsonRestore()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
        if not _layout_matches(manager.directory, step, abstract_state):
            raise
        raise DamagedCheckpoint(step, _first_line(e)) from None
    if checked:
        saved, now = restored["fingerprint"], fingerprint(restored["state"])
        for path in sorted(set(saved) | set(now)):
            if saved.get(path) != now.get(path):
                raise DamagedCheckpoint(step, f"{path} does not match the fingerprint saved with it")
    return restored["state"], restored["data"]


def _first_line(e: BaseException) -> str:
    """The first line of the innermost cause: orbax wraps tensorstore's error (which names the
    array and the file) in one that names only an index range."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:400]


def damage(workdir: str, step: int) -> str | None:
    """What makes checkpoint `step` unusable, found without reading its arrays; None if nothing
    (its arrays can still be damaged: `restore` finds that)."""
    path = _step_path(workdir, step)
    if not (path / COMMIT_MARKER).exists():
        return f"no {COMMIT_MARKER}: its save never finished"
    try:
        with _params_reader(workdir) as manager:
            meta = manager.metadata(step).item_metadata["state"]
    except Exception as e:
        return f"unreadable metadata ({_first_line(e)})"
    if meta is None or not hasattr(meta, "keys"):
        return "the train state's metadata is missing"
    for item in ("data", "fingerprint"):
        file = path / item / "metadata"
        if item == "fingerprint" and not (path / item).exists():
            continue  # written before fingerprints existed
        try:
            json.loads(file.read_text())
        except (OSError, ValueError) as e:
            return f"{item}/metadata is unreadable ({_first_line(e)})"
    return None


def _layout_matches(directory, step: int, abstract_state: Any) -> bool:
    """Whether checkpoint `step` (under the checkpoints `directory`) lists exactly the arrays
    (paths and shapes) of `abstract_state`: then a failed restore lies in the bytes, not in a
    changed config. Unreadable metadata counts as a match (damaged either way)."""
    try:
        with _reader(str(directory)) as manager:
            meta = manager.metadata(step).item_metadata["state"]
        saved = {
            k: tuple(m.shape) for k, m in ocp.tree.to_flat_dict(meta, sep="/").items() if hasattr(m, "shape")
        }
    except Exception:
        return True
    leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    return saved == {_path(keys): tuple(x.shape) for keys, x in leaves}


def set_aside(manager: ocp.CheckpointManager, workdir: str, steps) -> list[str]:
    """Moves damaged checkpoints `steps` to WORKDIR/damaged_checkpoints/ (never deletes them) and
    makes `manager` forget them; returns where each went. Call on every process."""
    moved = []
    if not steps:
        return moved
    if jax.process_index() == 0:
        dest_dir = epath.Path(workdir) / DAMAGED_DIR
        dest_dir.mkdir(parents=True, exist_ok=True)
        for step in steps:
            dest, n = dest_dir / str(step), 0
            while dest.exists():  # the same step found damaged by an earlier start
                n += 1
                dest = dest_dir / f"{step}.{n}"
            _step_path(workdir, step).rename(dest)
            moved.append(str(dest))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("core_jax.checkpoint.set_aside")
    manager.reload()
    return moved


def write_config(workdir: str, config) -> None:
    storage.makedirs(workdir)
    storage.write_text(storage.join(workdir, "config.json"), to_json(config))


def read_config(workdir: str):
    path = storage.join(workdir, "config.json")
    if not storage.exists(path):
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
    if not storage.isdir(d):
        return None
    with ocp.CheckpointManager(d) as manager:
        return manager.latest_step()


def _params_reader(workdir: str) -> ocp.CheckpointManager:
    return _reader(checkpoint_dir(workdir))


def _reader(directory: str) -> ocp.CheckpointManager:
    handlers = {
        "state": ocp.PyTreeCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "fingerprint": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(directory, item_handlers=handlers)


def _chosen_step(manager, workdir: str, step: int | None) -> int | None:
    """`step` when `workdir` has a checkpoint there (None: the newest, None when there is none);
    a FileNotFoundError naming the steps it has otherwise (a --step mistyped or long deleted)."""
    if step is None:
        return manager.latest_step()
    steps = sorted(manager.all_steps())
    if int(step) not in steps:
        if not steps:
            raise FileNotFoundError(f"{workdir} holds no checkpoint under {checkpoint_dir(workdir)}")
        shown = ", ".join(map(str, steps[-10:]))
        more = f" (the newest 10 of {len(steps)})" if len(steps) > 10 else ""
        which = "step" if len(steps) == 1 else "steps"
        raise FileNotFoundError(f"{workdir} has no checkpoint at step {step}; it has {which} {shown}{more}")
    return int(step)


def _required_step(manager, workdir: str, step: int | None) -> int:
    """`_chosen_step`, and a FileNotFoundError when the workdir holds no checkpoint at all."""
    step = _chosen_step(manager, workdir, step)
    if step is None:
        raise FileNotFoundError(f"{workdir} holds no checkpoint under {checkpoint_dir(workdir)}")
    return step


def _saved_metadata(manager, step: int, key: str = "params"):
    return manager.metadata(step).item_metadata["state"][key]


def param_shapes(workdir: str, step: int | None = None) -> Any:
    """The params tree of the newest (or given) checkpoint with each array's shape, read from the
    checkpoint's metadata (no array is loaded)."""
    with _params_reader(workdir) as manager:
        meta = _saved_metadata(manager, _required_step(manager, workdir, step))
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
        step = _chosen_step(manager, workdir, step)
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
        step = _required_step(manager, workdir, step)
        key = "ema" if ema and _has_ema(manager, step) else "params"
        params_meta = _saved_metadata(manager, step, key)
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
    with storage.open(path) as f:
        return json.load(f)
