"""The mesh and the ONE table that maps logical axis names to mesh axes.

Models name their axes (`embed`, `heads`, `act_batch`, ...) and never mention mesh axes; this module
is the only place that decides how a name is laid out on `data` / `fsdp` / `tensor`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Parameters are sharded over fsdp (ZeRO-3 style) on their model-width axis and over tensor on
# heads / mlp / vocab; activations keep the batch on (data, fsdp) and split heads / mlp on tensor.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("conv_h", None),
    ("conv_w", None),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("norm", None),
    ("length", None),
    ("patch", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_vocab", "tensor"),
    ("act_height", None),
    ("act_width", None),
    ("act_channels", None),
)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """Resolves `config.mesh` (-1 = the rest) to concrete (data, fsdp, tensor) sizes."""
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(
                f"mesh: {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices "
                f"({num_devices} is not divisible by {known})"
            )
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh: data*fsdp*tensor = {math.prod(sizes)} {tuple(sizes)} but there are {num_devices} devices"
        )
    return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """An Auto-typed mesh (linen sharding constraints raise under Explicit axes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception:  # CPU / odd topologies: plain row-major order is fine
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def _rules_dict():
    return dict(LOGICAL_AXIS_RULES)


def spec_for(
    logical_axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None
) -> P:
    """PartitionSpec for logical axes; mesh axes that do not divide a dimension are dropped."""
    rules = _rules_dict()
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical_axes):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} is not in core_jax.sharding.LOGICAL_AXIS_RULES")
        target = rules[name]
        axes = () if target is None else (target if isinstance(target, tuple) else (target,))
        kept = []
        size = 1
        for ax in axes:
            if ax in used:
                continue
            ax_size = mesh.shape[ax] if mesh is not None else 1
            if shape is not None and mesh is not None and shape[i] % (size * ax_size):
                continue
            kept.append(ax)
            size *= ax_size
        if mesh is not None:  # size-1 axes carry no information; keeping specs minimal helps goldens
            kept = [a for a in kept if mesh.shape[a] > 1]
        used.update(kept)
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def logical_sharding(mesh: Mesh, logical_axes, shape) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical_axes, shape, mesh))


def _current_mesh():
    """The mesh set by `jax.set_mesh` (an AbstractMesh under jit), or None. The deprecated
    `with mesh:` context is not seen: every caller here uses jax.set_mesh."""
    m = jax.sharding.get_abstract_mesh()
    return None if m is None or m.empty else m


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside a mesh."""
    mesh = _current_mesh()
    if mesh is None or math.prod(mesh.shape.values()) == 1:
        return x
    spec = spec_for(logical_axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec)


def _entry_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, 'fsdp' or ('data', 'fsdp'))."""
    return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def undivided_axes(
    logical_axes: Sequence[str | None], shape: Sequence[int], mesh
) -> dict[str, tuple[str, int]]:
    """Mesh axes (of size > 1) the rules give an array but its sharding cannot use, because they
    do not divide the dimension they would split: {mesh axis: (logical axis, dimension)}. The
    array is replicated over those axes. `mesh` needs only `.shape` (a Mesh or an AbstractMesh)."""
    wanted = spec_for(logical_axes, None, mesh)
    kept = {ax for entry in spec_for(logical_axes, shape, mesh) for ax in _entry_axes(entry)}
    out = {}
    for i, entry in enumerate(wanted):
        for ax in _entry_axes(entry):
            if ax not in kept and ax not in out:
                out[ax] = (logical_axes[i], int(shape[i]))
    return out


def undivided_weights(mesh, abstract_boxed_tree) -> list[tuple[str, tuple[int, ...], dict]]:
    """(path, shape, undivided_axes) of every annotated leaf that loses a mesh axis."""
    is_boxed = lambda l: isinstance(l, nn.Partitioned)  # noqa: E731
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_boxed_tree, is_leaf=is_boxed)[0]:
        if is_boxed(leaf):
            lost = undivided_axes(leaf.names, leaf.value.shape, mesh)
            if lost:
                name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
                out.append((name, tuple(leaf.value.shape), lost))
    return out


# Below this share of the parameters, replicated weights (a 3-channel input conv, an odd-sized
# bias) cost nothing worth a warning.
UNDIVIDED_WARN_FRACTION = 0.01


def undivided_warning(mesh, abstract_boxed_tree) -> str | None:
    """One line naming the weights replicated over a mesh axis that does not divide them (how much
    of the model that is, which axis sizes and dimensions, the largest such weight), or None when
    they hold under UNDIVIDED_WARN_FRACTION of the parameters.

    spec_for drops such an axis instead of padding, which is right for a 3-channel conv but turns a
    ZeRO-3 run into a replicated one when the model width does not divide by the fsdp size (the
    DALL-E paper's 3968 on fsdp 256): better said at startup than found as an OOM after compiling."""
    weights = undivided_weights(mesh, abstract_boxed_tree)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(abstract_boxed_tree)))
    lost = sum(math.prod(shape) for _, shape, _ in weights)
    if not weights or lost < UNDIVIDED_WARN_FRACTION * total:
        return None
    pairs = sorted(
        {
            f"{ax}={mesh.shape[ax]} on {name}={dim}"
            for _, _, axes in weights
            for ax, (name, dim) in axes.items()
        }
    )
    shown = ", ".join(pairs[:4]) + (f" and {len(pairs) - 4} more" if len(pairs) > 4 else "")
    path, shape, _ = max(weights, key=lambda w: math.prod(w[1]))
    return (
        f"warning: {lost:,} of {total:,} parameters ({100 * lost / max(total, 1):.1f}%, in "
        f"{len(weights)} arrays) are replicated over a mesh axis that does not divide them "
        f"({shown}); the largest is {path} {shape}. Mesh sizes that divide those dimensions "
        f"shard them."
    )


def tree_shardings(mesh: Mesh, abstract_boxed_tree) -> Any:
    """NamedSharding for every leaf of a (possibly boxed) abstract tree; unannotated leaves replicate."""

    def one(leaf):
        if isinstance(leaf, nn.Partitioned):
            return logical_sharding(mesh, leaf.names, leaf.value.shape)
        return NamedSharding(mesh, P())

    return jax.tree.map(one, abstract_boxed_tree, is_leaf=lambda l: isinstance(l, nn.Partitioned))


def batch_sharding(mesh: Mesh, ndim: int, leading: int | None = None) -> NamedSharding:
    """Batch arrays are split on their leading axis over (data, fsdp)."""
    return NamedSharding(
        mesh,
        spec_for(
            ("act_batch",) + (None,) * (ndim - 1),
            None if leading is None else (leading,) + (1,) * (ndim - 1),
            mesh,
        ),
    )


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]
