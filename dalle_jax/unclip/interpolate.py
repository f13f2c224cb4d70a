"""Spherical interpolation of CLIP embeddings and start noises (unCLIP's interpolations,
Ramesh et al. 2022, section 3.2: z_i_theta = slerp(z_i1, z_i2, theta))."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Below this angle (radians) the two directions are treated as parallel: the slerp weights divide
# by sin(theta), and a normalised linear blend differs from them by O(theta^2) there.
PARALLEL_ANGLE = 1e-4


def slerp(a: jax.Array, b: jax.Array, frac) -> jax.Array:
    """Per example (leading batch dim), a's and b's flattened vectors interpolated at `frac` (a
    scalar or [B]; 0 gives a, 1 gives b): the directions by the slerp formula, the norms linearly,

        slerp(a, b, f) = ((1 - f) |a| + f |b|) * (sin((1 - f) theta) u + sin(f theta) v) / sin(theta),

    u = a / |a|, v = b / |b|, theta the angle between them. For unit embeddings this is the plain
    slerp; for two Gaussian noises (norms ~ sqrt(dim)) every point keeps the norm of a noise, where a
    linear blend would shrink it by up to 1 / sqrt(2). frac 0 and 1 return a and b bit for bit.
    Undefined for exactly opposite vectors."""
    shape = a.shape
    a32 = a.reshape(shape[0], -1).astype(jnp.float32)
    b32 = b.reshape(shape[0], -1).astype(jnp.float32)
    frac = jnp.broadcast_to(jnp.asarray(frac, jnp.float32), (shape[0],))[:, None]
    norm_a = jnp.linalg.norm(a32, axis=1, keepdims=True)
    norm_b = jnp.linalg.norm(b32, axis=1, keepdims=True)
    u, v = a32 / norm_a, b32 / norm_b
    # 2 atan2(|u - v|, |u + v|) keeps its digits at small angles, where arccos(u . v) loses them.
    theta = 2.0 * jnp.arctan2(
        jnp.linalg.norm(u - v, axis=1, keepdims=True), jnp.linalg.norm(u + v, axis=1, keepdims=True)
    )
    parallel = theta < PARALLEL_ANGLE
    safe_sin = jnp.where(parallel, 1.0, jnp.sin(theta))
    spherical = (jnp.sin((1 - frac) * theta) * u + jnp.sin(frac * theta) * v) / safe_sin
    linear = (1 - frac) * u + frac * v
    direction = jnp.where(parallel, linear / jnp.linalg.norm(linear, axis=1, keepdims=True), spherical)
    out = ((1 - frac) * norm_a + frac * norm_b) * direction
    # The formula rounds away the last bit of the ends; returning them as given lets an end frame
    # redraw exactly what the same embedding and noise draw outside an interpolation.
    out = jnp.where(frac == 0, a32, jnp.where(frac == 1, b32, out))
    return out.reshape(shape).astype(a.dtype)
