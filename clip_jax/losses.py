"""Contrastive losses over the GLOBAL batch of L2-normalised image / text features.

`softmax_loss` (CLIP) and `sigmoid_loss` (SigLIP) are written over the global arrays: under jit with
the batch sharded over (data, fsdp), XLA gathers what each device needs, so the value is exactly the
single-device loss on the same batch. `sigmoid_loss_chunked` gives the same value without ever
materialising the [B, B] logits: each device keeps its image rows and passes its text rows around
the ring of batch shards with ppermute, one [b, b] block at a time.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from core_jax.sharding import constrain, spec_for

try:  # jax >= 0.7 exports it at the top level; older versions only under experimental
    _shard_map = jax.shard_map
except AttributeError:  # pragma: no cover - depends on the installed jax
    from jax.experimental.shard_map import shard_map as _shard_map


def _in_batch_accuracies(logits):
    labels = jnp.arange(logits.shape[0])
    i2t = jnp.mean((jnp.argmax(logits, axis=1) == labels).astype(jnp.float32))
    t2i = jnp.mean((jnp.argmax(logits, axis=0) == labels).astype(jnp.float32))
    return {"i2t_accuracy": i2t, "t2i_accuracy": t2i}


def pairwise_logits(image_features, text_features, scale, bias=0.0):
    """scale * image . text^T + bias, rows sharded like the batch (each device keeps its rows)."""
    logits = jnp.einsum("ie,te->it", image_features, text_features, preferred_element_type=jnp.float32)
    return constrain(logits * scale + bias, ("act_batch", None))


def softmax_loss(image_features, text_features, scale):
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropies over the global batch.

    Returns (loss, metrics) with in-batch accuracies.
    """
    logits = pairwise_logits(image_features, text_features, scale)
    diagonal = jnp.diagonal(logits)
    i2t = jnp.mean(jax.nn.logsumexp(logits, axis=1) - diagonal)
    t2i = jnp.mean(jax.nn.logsumexp(logits, axis=0) - diagonal)
    return 0.5 * (i2t + t2i), _in_batch_accuracies(logits)


def sigmoid_loss(image_features, text_features, scale, bias):
    """SigLIP: every pair is an independent binary problem (positive on the diagonal).

    Summed over all B*B pairs and divided by B, as in the SigLIP paper.
    """
    logits = pairwise_logits(image_features, text_features, scale, bias)
    n = logits.shape[0]
    signs = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
    loss = -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / n
    return loss, _in_batch_accuracies(logits)


def current_mesh():
    """The mesh set by `jax.set_mesh` (the trainer sets one around every step), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or getattr(mesh, "empty", True):
        return None
    return mesh


def _batch_axes(mesh, batch_size: int) -> tuple[str, ...]:
    spec = spec_for(("act_batch",), (batch_size,), mesh)
    if not spec or spec[0] is None:
        return ()
    return spec[0] if isinstance(spec[0], tuple) else (spec[0],)


def sigmoid_loss_chunked(image_features, text_features, scale, bias, mesh=None):
    """`sigmoid_loss` computed block by block around the ring of batch shards.

    With the batch split over n shards (the mesh axes `act_batch` maps to), every device computes
    n blocks of [b, b] logits (b = B / n) against the text rows that visit it, so memory stays
    O(b^2) instead of O(B^2). Values and gradients equal `sigmoid_loss`. Without a mesh (or on one
    shard) it is `sigmoid_loss` itself.
    """
    mesh = current_mesh() if mesh is None else mesh
    batch = image_features.shape[0]
    axes = _batch_axes(mesh, batch) if mesh is not None else ()
    if not axes:
        return sigmoid_loss(image_features, text_features, scale, bias)
    num_shards = math.prod(mesh.shape[a] for a in axes)
    row_spec = P(axes if len(axes) > 1 else axes[0])

    @functools.partial(
        _shard_map, mesh=mesh, in_specs=(row_spec, row_spec, P(), P()), out_specs=(P(), P(), P())
    )
    def ring(img, txt, scale, bias):
        # Shard k sends its text rows to shard k+1, so after j hops device k holds shard k-j's.
        perm = [(k, (k + 1) % num_shards) for k in range(num_shards)]
        send = lambda x: jax.lax.ppermute(x, axes, perm)

        def block_logits(txt_block):
            logits = jnp.einsum("ie,te->it", img, txt_block, preferred_element_type=jnp.float32)
            return logits * scale + bias

        # Own shard: positives on the diagonal. The max over negatives is tracked for the accuracy
        # metrics: per image row here, per text row on a max that travels with the text block.
        logits = block_logits(txt)
        eye = jnp.eye(img.shape[0], dtype=bool)
        total = -jnp.sum(jax.nn.log_sigmoid(jnp.where(eye, logits, -logits)))
        positive = jnp.diagonal(logits)
        negatives = jnp.where(eye, -jnp.inf, logits)
        row_max, col_max = negatives.max(axis=1), negatives.max(axis=0)

        def hop(carry, _):
            txt_block, col_max, row_max, total = carry
            txt_block, col_max = send(txt_block), send(col_max)
            logits = block_logits(txt_block)
            total = total - jnp.sum(jax.nn.log_sigmoid(-logits))
            return (
                txt_block,
                jnp.maximum(col_max, logits.max(axis=0)),
                jnp.maximum(row_max, logits.max(axis=1)),
                total,
            ), None

        (_, col_max, row_max, total), _ = jax.lax.scan(
            hop, (txt, col_max, row_max, total), None, length=num_shards - 1
        )
        col_max = send(col_max)  # one more hop brings each text block's max home
        correct = lambda best_negative: (
            jax.lax.psum(jnp.sum((positive > jax.lax.stop_gradient(best_negative)).astype(jnp.float32)), axes)
            / batch
        )
        return jax.lax.psum(total, axes) / batch, correct(row_max), correct(col_max)

    loss, i2t, t2i = ring(image_features, text_features, scale, bias)
    return loss, {"i2t_accuracy": i2t, "t2i_accuracy": t2i}


def contrastive_loss(kind: str, features: dict):
    """Dispatch on config.model.loss; `features` is CLIP.__call__'s output."""
    img, txt, scale, bias = features["image"], features["text"], features["scale"], features["bias"]
    if kind == "softmax":
        return softmax_loss(img, txt, scale)
    if kind == "sigmoid":
        return sigmoid_loss(img, txt, scale, bias)
    if kind == "sigmoid_chunked":
        return sigmoid_loss_chunked(img, txt, scale, bias)
    raise ValueError(f"model.loss: unknown loss {kind!r}; choose softmax, sigmoid or sigmoid_chunked")
