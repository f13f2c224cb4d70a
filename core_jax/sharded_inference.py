"""Running a trained model the way it was trained: what every inference command shares.

The mesh is the workdir's `config.mesh` (with `--config.mesh.data/fsdp/tensor` overrides, as in
training), the params are restored straight onto their training shardings (a 12B model never sits
whole on one chip), the rows of a batch are split over the (data, fsdp) axes and the results come
back to the host. Several hosts run the same command with `--coordinator_address/--num_processes/
--process_id`; every process holds the same rows, feeds only the shards its devices own, gets every
result back, and only process 0 (`is_writer`) writes.

    add_flags(parser)                  # argparse: --mesh, --config.mesh.*, the process flags
    args = parser.parse_args()
    start(args)                        # joins a multi-process run, before any device is touched
    mesh = choose_mesh(args, config)   # None: one device, params unsharded
    params = load_params(workdir, init_fn, mesh, step=None, ema=True)[1]
    out = run(mesh, fn, params, rows)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from core_jax import checkpoint, distributed, sharding
from core_jax.errors import ConfigError

MESH_CHOICES = ("auto", "train", "data", "none")


def add_flags(parser) -> None:
    """--mesh, --config.mesh.{data,fsdp,tensor} and the process flags, for argparse commands."""
    parser.add_argument(
        "--mesh",
        choices=MESH_CHOICES,
        default="auto",
        help="train = the workdir's config.mesh (params sharded as in training); data = params "
        "replicated, rows split over every device; none = one device; auto = train on several "
        "accelerators, several processes or with --config.mesh.*, else none",
    )
    for axis in sharding.MESH_AXES:
        parser.add_argument(
            f"--config.mesh.{axis}",
            dest=f"mesh_{axis}",
            type=int,
            default=None,
            help=f"overrides the workdir's config.mesh.{axis} (-1 = the rest of the devices, "
            "taken from the axis the config gave them)",
        )
    distributed.add_argparse_flags(parser)


def mesh_overrides(args) -> dict[str, int]:
    """The --config.mesh.* flags given, {axis: size}."""
    given = {axis: getattr(args, f"mesh_{axis}", None) for axis in sharding.MESH_AXES}
    return {axis: size for axis, size in given.items() if size is not None}


def start(args) -> bool:
    """Joins the multi-process run the process flags (or the cluster's environment) describe;
    True when there is one. A ValueError names an inconsistent flag."""
    return distributed.maybe_initialize(args)


def train_mesh(config, overrides: dict[str, int] | None = None, devices=None):
    """The mesh of `config.mesh` with `overrides` applied, over `devices` (default: all devices of
    all processes); a ConfigError when the sizes cannot fill them. An override of -1 takes the
    rest of the devices from the config's own -1 axis (which becomes 1): one flag such as
    `--config.mesh.fsdp=-1` then serves every model a command loads, whatever axis each config
    gave the rest to."""
    overrides = dict(overrides or {})
    mesh_config = {axis: int(config.mesh[axis]) for axis in sharding.MESH_AXES}
    if -1 in overrides.values():
        mesh_config = {axis: 1 if size == -1 else size for axis, size in mesh_config.items()}
    mesh_config.update(overrides)
    try:
        return sharding.make_mesh(mesh_config, devices)
    except ValueError as e:
        raise ConfigError(f"config.{e} (set --config.mesh.data/fsdp/tensor)") from None


def choose_mesh(args, config):
    """The mesh `--mesh` asks for (see `add_flags`), or None for one device."""
    overrides = mesh_overrides(args)
    choice = getattr(args, "mesh", "auto")
    if overrides and choice in ("data", "none"):
        raise ValueError(f"--config.mesh.* shapes the training mesh; it does not go with --mesh {choice}")
    if choice == "auto":
        accelerators = jax.device_count() > 1 and jax.devices()[0].platform != "cpu"
        # Fake CPU devices share the same cores: one device is faster there unless asked.
        choice = "train" if overrides or accelerators or jax.process_count() > 1 else "none"
    if choice == "none":
        if jax.process_count() > 1:
            raise ValueError("--mesh none runs on one device; a multi-process run needs --mesh train or data")
        return None
    if choice == "data":
        return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    return train_mesh(config, overrides)


def param_shardings(mesh, abstract_boxed) -> Any:
    """NamedSharding per leaf of the unboxed params: the trainer's layout from the logical names."""
    return nn.meta.unbox(sharding.tree_shardings(mesh, abstract_boxed))


def load_params(workdir: str, init_fn, mesh, *, step: int | None = None, ema: bool = True):
    """(config, params) of `workdir`, each array restored straight onto its training sharding on
    `mesh` (every process reads only its own shards); mesh None: onto one local device.
    `init_fn()` gives the model's boxed params; only its shapes and logical names are used
    (jax.eval_shape), and only with a mesh."""
    shardings = None if mesh is None else param_shardings(mesh, jax.eval_shape(init_fn))
    return checkpoint.load_params(workdir, step, shardings=shardings, ema=ema)


def shard_rows(mesh, rows: np.ndarray) -> jax.Array:
    """Rows every process holds in full -> one global array split over (data, fsdp) on its leading
    axis; each process places only the shards of its own devices (axes that do not divide the
    row count are replicated instead)."""
    rows = np.asarray(rows)
    rows_sharding = sharding.batch_sharding(mesh, rows.ndim, rows.shape[0])
    return jax.make_array_from_callback(rows.shape, rows_sharding, lambda index: rows[index])


def run(mesh, fn, params, rows):
    """`fn(params, rows)`. mesh None: on this process's device whatever mesh the caller has set (a
    trainer's evaluator runs under a mesh spanning other processes' devices), a device array back;
    a mesh: the rows split over it and the result gathered, numpy on every process."""
    if mesh is None:
        with jax.set_mesh(None):
            return fn(params, rows)
    with jax.set_mesh(mesh):
        return gather(fn(params, shard_rows(mesh, rows)))


def pad_rows(mesh, rows: int) -> int:
    """`rows` rounded up to a multiple of the (data, fsdp) size, so that every device gets rows."""
    if mesh is None:
        return rows
    dp = sharding.data_parallel_size(mesh)
    return -(-rows // dp) * dp


def gather(x) -> np.ndarray:
    """A (possibly multi-process) array, or numpy -> all of it as numpy, on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def is_writer() -> bool:
    """Only process 0 writes files; the others compute their shards and stop."""
    return distributed.is_main_process()
