"""Small pieces every model uses: activation constraints, remat policies, stacked layers."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from core_jax.sharding import constrain  # noqa: F401  (re-exported for models)

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


def remat_policy(name: str):
    """Maps a config string to a jax.checkpoint policy; 'none' means no remat at all."""
    if name == "none":
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "dots":
        return jax.checkpoint_policies.checkpoint_dots
    if name == "dots_no_batch":
        return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
    raise ValueError(f"remat: unknown policy {name!r}; choose one of {REMAT_POLICIES}")


def dense(x: jax.Array, kernel: jax.Array, in_dims: int = 1) -> jax.Array:
    """x [..., *in] contracted with kernel [*in, *out] -> [..., *out].

    On CPU as ONE 2-D matmul [rows, in] @ [in, out]: XLA:CPU differentiates a dot_general whose
    kernel meets several activation dims (batch, length, heads) through transposed copies of the
    activations, and the reshaped form ran a transformer MLP's backward 2x faster (the shapes
    DALL-E's whole train step ~7%, README). The reshapes only merge adjacent dims, so a sharded
    leading dim stays sharded. On TPU/GPU the dot_general is left as it is: their layouts tile the
    minor dims, where a reshape of e.g. 50 tokens or 64-wide heads could cost a relayout copy.
    """
    in_shape = kernel.shape[:in_dims]
    if x.shape[x.ndim - in_dims :] != in_shape:
        raise ValueError(
            f"dense: input dims {x.shape[x.ndim - in_dims :]} do not match the kernel's {in_shape}"
        )
    lead, out_shape = x.shape[: x.ndim - in_dims], kernel.shape[in_dims:]
    if jax.default_backend() != "cpu":
        contract = (tuple(range(x.ndim - in_dims, x.ndim)), tuple(range(in_dims)))
        return jax.lax.dot_general(x, kernel, (contract, ((), ())))
    n_in = math.prod(in_shape)
    y = x.reshape(-1, n_in) @ kernel.reshape(n_in, -1)
    return y.reshape(lead + out_shape)


def dtype_of(name: str):
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
    except KeyError:
        raise ValueError(f"compute_dtype: unknown dtype {name!r}; use float32 or bfloat16") from None


class _ScanBody(nn.Module):
    """Adapts a block `x -> x` to nn.scan's `(carry, _) -> (carry, None)` form."""

    block_cls: Any
    block_kwargs: dict

    @nn.compact
    def __call__(self, x, *args):
        return self.block_cls(**self.block_kwargs, name="block")(x, *args), None


class LayerStack(nn.Module):
    """`num_layers` copies of a block, scanned (one compiled body, params get a `layers` axis) or
    unrolled (one param subtree per layer), each optionally rematerialised."""

    block_cls: Any
    num_layers: int
    block_kwargs: dict
    scan: bool = True
    remat: str = "none"
    unroll: int = 1  # layers per iteration of the scan's loop; >= num_layers: no loop at all
    # Arguments after x that are static Python values (e.g. deterministic flags) and so must not be
    # traced through remat; given as positions in *args.
    static_argnums: tuple[int, ...] = ()
    # Positions in *args that hold one slice per layer on their leading axis (e.g. the DALL-E
    # per-layer attention mask kind); the rest are broadcast to every layer.
    per_layer_argnums: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, x, *args):
        policy = remat_policy(self.remat)
        if self.scan:
            body = _ScanBody
            if self.remat != "none":
                body = nn.remat(
                    body,
                    policy=policy,
                    prevent_cse=False,
                    static_argnums=tuple(2 + i for i in self.static_argnums),
                )
            scanned = nn.scan(
                body,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=tuple(0 if i in self.per_layer_argnums else nn.broadcast for i in range(len(args))),
                length=self.num_layers,
                unroll=max(1, min(int(self.unroll), self.num_layers)),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(self.block_cls, dict(self.block_kwargs), name="scan")(x, *args)
            return x
        block = self.block_cls
        if self.remat != "none":
            block = nn.remat(
                block,
                policy=policy,
                prevent_cse=True,
                static_argnums=tuple(2 + i for i in self.static_argnums),
            )
        for i in range(self.num_layers):
            layer_args = [a[i] if j in self.per_layer_argnums else a for j, a in enumerate(args)]
            x = block(**self.block_kwargs, name=f"layer_{i}")(x, *layer_args)
        return x


def layer_stack(
    block_cls,
    num_layers: int,
    *,
    scan: bool,
    remat: str = "none",
    name: str = "layers",
    static_argnums: tuple[int, ...] = (),
    per_layer_argnums: tuple[int, ...] = (),
    unroll: int = 1,
    **block_kwargs,
) -> LayerStack:
    return LayerStack(
        block_cls=block_cls,
        num_layers=num_layers,
        block_kwargs=block_kwargs,
        scan=scan,
        remat=remat,
        unroll=unroll,
        static_argnums=static_argnums,
        per_layer_argnums=per_layer_argnums,
        name=name,
    )
