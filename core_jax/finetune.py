"""Fine-tuning in the shared trainer: start from another workdir's params, keep some of them fixed.

    --config.init_from=runs/dvae        # weights of that workdir's newest checkpoint (fresh runs only):
                                        # its EMA when it kept one, unless init_from_raw_weights=True
    --config.frozen=encoder             # comma list of param-path prefixes that get no updates

`frozen` paths are '/'-joined param-tree keys ('encoder', 'decoder/group_4'). Their gradients are
dropped (so never computed, and not in grad_norm), their updates are zero and the optimizer keeps no
moments for them (optax.multi_transform; weight decay does not touch them either): a frozen subtree
stays bit-identical however long the run. A run that resumes from its own checkpoint never reads
`init_from` again.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from core_jax import checkpoint
from core_jax.errors import ConfigError


def frozen_prefixes(config) -> tuple[str, ...]:
    raw = str(config.get("frozen", "") or "")
    return tuple(p.strip().strip("/") for p in raw.split(",") if p.strip().strip("/"))


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _shapes_by_path(tree, is_leaf=None) -> dict[str, tuple]:
    """'/'-joined path -> shape of every leaf (arrays, ShapeDtypeStructs, or shape tuples)."""
    return {
        _path_str(p): tuple(getattr(x, "shape", x))
        for p, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)
    }


def _is_frozen(path: str, prefixes) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def param_labels(params, prefixes) -> dict:
    """'frozen' / 'train' per leaf of `params`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if _is_frozen(_path_str(path), prefixes) else "train", params
    )


def check_frozen(abstract_params, prefixes) -> tuple[int, int]:
    """(frozen, total) parameter counts; ConfigError for a prefix that names no param, or when
    nothing would be left to train."""
    paths = [(path, int(np.prod(shape))) for path, shape in _shapes_by_path(abstract_params).items()]
    for prefix in prefixes:
        if not any(_is_frozen(path, (prefix,)) for path, _ in paths):
            tops = sorted({path.split("/")[0] for path, _ in paths})
            raise ConfigError(
                f"config.frozen: no parameter path starts with {prefix!r} (top-level "
                f"params: {', '.join(tops)})"
            )
    frozen = sum(n for path, n in paths if _is_frozen(path, prefixes))
    total = sum(n for _, n in paths)
    if prefixes and frozen == total:
        raise ConfigError(f"config.frozen={','.join(prefixes)!r} freezes every parameter: nothing to train")
    return frozen, total


def drop_frozen(grads, prefixes):
    """Zero gradients for the frozen params: XLA then never computes them, and the logged
    grad_norm covers only what is trained."""
    if not prefixes:
        return grads
    return jax.tree_util.tree_map_with_path(
        lambda path, g: jnp.zeros_like(g) if _is_frozen(_path_str(path), prefixes) else g, grads
    )


def freeze(tx: optax.GradientTransformation, prefixes) -> optax.GradientTransformation:
    """`tx` for the trainable params, zero updates (and no optimizer state) for the frozen ones."""
    if not prefixes:
        return tx
    return optax.multi_transform(
        {"train": tx, "frozen": optax.set_to_zero()}, lambda params: param_labels(params, prefixes)
    )


def check_param_shapes(source: str, shapes, abstract_params) -> None:
    """ConfigError naming the first path whose presence or shape in `shapes` (a checkpoint's
    param_shapes, read by `source`) differs from this run's model (`abstract_params`)."""
    want = _shapes_by_path(abstract_params)
    have = _shapes_by_path(shapes, is_leaf=lambda s: isinstance(s, tuple))
    for path in sorted(set(want) | set(have)):
        if path not in have:
            raise ConfigError(
                f"{source} has no parameter {path!r} that this model needs (a different model or config?)"
            )
        if path not in want:
            raise ConfigError(
                f"{source} has a parameter {path!r} this model does not (a different model or config?)"
            )
        if have[path] != want[path]:
            raise ConfigError(
                f"{source}: parameter {path!r} has shape {have[path]}, this model needs {want[path]}"
            )


def load_init_params(init_from: str, abstract_params, param_shardings, raw_weights: bool = False):
    """(params, whether they are its EMA) of `init_from`'s newest checkpoint, placed in the
    run's shardings: its EMA when it has one (the weights its evaluations and inference used),
    unless `raw_weights`; ConfigError naming the first path whose presence or shape differs from
    this run's model."""

    try:
        shapes = checkpoint.param_shapes(init_from)
    except FileNotFoundError as e:
        raise ConfigError(
            f"config.init_from={init_from!r} holds no checkpoint (expected a workdir "
            f"written by a trainer or a converter): {e}"
        ) from None
    check_param_shapes(f"config.init_from={init_from!r}", shapes, abstract_params)
    from_ema = not raw_weights and checkpoint.workdir_has_ema(init_from)
    _, params = checkpoint.load_params(init_from, shardings=param_shardings, ema=not raw_weights)
    return params, from_ema
