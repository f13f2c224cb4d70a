"""The DALL-E transformer: one decoder-only stream of text tokens then dVAE image tokens.

The stream layout, the input shift and the attention masks are defined in `dalle_jax/masks.py`.
Inputs are `stream_ids` int32 [B, S] for positions start .. start+S-1 of the *input* stream
(`input_stream(text, image_tokens)` builds the whole one): id 0 at position 0 (BOS, a learned
vector), text ids at 1 .. text_len, image ids after. Text ids cover the BPE vocab plus one pad id per
text position (`vocab + i`, the DALL-E paper's per-position padding), hence `total_text_vocab` rows.

`decode=True` keeps a per-layer key/value cache in the flax 'cache' collection (shape
[B, heads, T, head_dim], a leading `layers` axis when scanned): each call writes the keys of its S
positions at `start` and attends over the whole cache with the mask rows of those positions, so
prefill (start=0, S=text_len+1) and one-token steps are the same code.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from core_jax.layers import MLP, Attention, LayerNorm, normal, param
from core_jax.modeling import constrain, dense, dtype_of, layer_stack
from dalle_jax import masks as masks_lib


@dataclasses.dataclass(frozen=True)
class DalleConfig:
    """Everything that fixes the model's shapes and computation (hashable: a static jit argument)."""

    text_len: int
    text_vocab_size: int  # BPE vocab without the per-position pad ids
    image_grid: int  # the dVAE grid side: n_image = image_grid ** 2
    image_vocab_size: int  # dVAE codebook size
    d_model: int
    num_heads: int
    head_dim: int
    num_layers: int
    mlp_dim: int
    layer_kinds: tuple[str, ...]  # one attention mask kind per layer (masks.KINDS)
    conv_kernel: int = 11
    legacy_masks: bool = False  # the row/column/conv masks of older versions (see masks.py)
    dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    scan_unroll: int = 1

    def __post_init__(self):
        for name in (
            "text_len",
            "text_vocab_size",
            "image_grid",
            "image_vocab_size",
            "d_model",
            "num_heads",
            "head_dim",
            "num_layers",
            "mlp_dim",
        ):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if len(self.layer_kinds) != self.num_layers:
            raise ValueError(f"{len(self.layer_kinds)} layer kinds for {self.num_layers} layers")
        if "conv" in self.layer_kinds and (self.conv_kernel < 1 or self.conv_kernel % 2 == 0):
            raise ValueError(f"model.conv_kernel must be a positive odd number, got {self.conv_kernel}")
        dtype_of(self.dtype)

    @property
    def total_text_vocab(self) -> int:
        return self.text_vocab_size + self.text_len

    @property
    def num_image_tokens(self) -> int:
        return self.image_grid**2

    @property
    def seq_len(self) -> int:
        return self.text_len + self.num_image_tokens

    @classmethod
    def from_config(cls, config, workdir: str | None = None) -> "DalleConfig":
        """From a full run config (`config.model` plus top-level compute_dtype/scan_layers/remat);
        `workdir`: where a recorded config.json came from, named if its masks cannot be told."""
        m = config.model
        return cls(
            text_len=int(m.text_len),
            text_vocab_size=int(m.text_vocab_size),
            image_grid=int(m.image_grid),
            image_vocab_size=int(m.image_vocab_size),
            d_model=int(m.d_model),
            num_heads=int(m.num_heads),
            head_dim=int(m.head_dim),
            num_layers=int(m.num_layers),
            mlp_dim=int(m.mlp_dim),
            layer_kinds=masks_lib.layer_kinds(m.attention_pattern, int(m.num_layers)),
            conv_kernel=int(m.conv_kernel),
            legacy_masks=masks_lib.recorded_legacy_masks(m, workdir),
            dtype=str(config.compute_dtype),
            scan_layers=bool(config.scan_layers),
            remat=str(config.remat),
            scan_unroll=int(config.get("scan_unroll", 1)),
        )  # absent in older workdirs' configs

    def replace(self, **changes) -> "DalleConfig":
        return dataclasses.replace(self, **changes)


def input_stream(text: jax.Array, image_tokens: jax.Array) -> jax.Array:
    """[B, text_len] + [B, n_image] -> the shifted input ids [B, T]: BOS(0), text, image[:-1]."""
    bos = jnp.zeros((text.shape[0], 1), jnp.int32)
    return jnp.concatenate([bos, text.astype(jnp.int32), image_tokens[:, :-1].astype(jnp.int32)], 1)


def unconditional_text(cfg: DalleConfig, batch: int) -> jax.Array:
    """All-pad text (pad at position i is text_vocab_size + i): the caption-dropout stream."""
    row = cfg.text_vocab_size + jnp.arange(cfg.text_len, dtype=jnp.int32)
    return jnp.broadcast_to(row, (batch, cfg.text_len))


class Block(nn.Module):
    """Pre-LayerNorm attention + MLP; `kind` (int32 scalar) picks this layer's mask."""

    cfg: DalleConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, mask_table, kind, start):
        cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
        names = ("act_batch", "act_length", "act_embed")
        depth = math.sqrt(2 * cfg.num_layers)  # residual-branch outputs start smaller in deep stacks
        attn = Attention(
            num_heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            names=("query", "key", "value"),
            in_std=1.0 / math.sqrt(cfg.d_model),
            out_std=1.0 / math.sqrt(cfg.num_heads * cfg.head_dim) / depth,
            float32_logits=True,
            cache_length=cfg.seq_len if self.decode else 0,
            dtype=dtype,
            name="attn",
        )
        x = x + attn(LayerNorm(dtype, name="ln_attn")(x), mask_table[kind], start)
        x = constrain(x, names)
        mlp = MLP(
            mlp_dim=cfg.mlp_dim,
            activation="gelu_tanh",
            names=("in", "out"),
            in_std=1.0 / math.sqrt(cfg.d_model),
            out_std=1.0 / math.sqrt(cfg.mlp_dim) / depth,
            dtype=dtype,
            name="mlp",
        )
        x = x + mlp(LayerNorm(dtype, name="ln_mlp")(x))
        return constrain(x, names)


class DalleTransformer(nn.Module):
    """`__call__(stream_ids [B, S], start=0, heads='split')`.

    heads='split' (needs the whole stream, S == T, start 0): (text_logits [B, text_len, total_text_vocab],
    image_logits [B, n_image, image_vocab]), the predictions of every text and image token.
    heads='image': image-head logits [B, S, image_vocab] at every given position (sampling).
    Logits are float32.
    """

    cfg: DalleConfig
    decode: bool = False

    def _embed(self, stream_ids, start):
        cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
        d, lt, grid = cfg.d_model, cfg.text_len, cfg.image_grid
        emb_init = normal(0.02)
        text_table = param(self, "text_embedding", emb_init, (cfg.total_text_vocab, d), ("vocab", "embed"))
        image_table = param(self, "image_embedding", emb_init, (cfg.image_vocab_size, d), ("vocab", "embed"))
        bos = param(self, "bos", emb_init, (d,), ("embed",))
        text_pos = param(self, "text_position", emb_init, (lt + 1, d), ("length", "embed"))
        row_pos = param(self, "image_row_position", emb_init, (grid, d), ("length", "embed"))
        col_pos = param(self, "image_column_position", emb_init, (grid, d), ("length", "embed"))

        pos = start + jnp.arange(stream_ids.shape[1])
        is_text = (pos <= lt)[None, :, None]
        text_tok = jnp.take(text_table, jnp.clip(stream_ids, 0, cfg.total_text_vocab - 1), axis=0)
        image_tok = jnp.take(image_table, jnp.clip(stream_ids, 0, cfg.image_vocab_size - 1), axis=0)
        tok = jnp.where(is_text, text_tok, image_tok)
        tok = jnp.where((pos == 0)[None, :, None], bos, tok)
        held = jnp.clip(pos - lt - 1, 0, cfg.num_image_tokens - 1)  # image token a position holds
        position = jnp.where(
            is_text[0], text_pos[jnp.clip(pos, 0, lt)], row_pos[held // grid] + col_pos[held % grid]
        )
        x = (tok + position[None]).astype(dtype)
        return constrain(x, ("act_batch", "act_length", "act_embed"))

    def _head(self, name, x, vocab):
        w = param(self, f"{name}_kernel", normal(0.02), (self.cfg.d_model, vocab), ("embed", "vocab"))
        b = param(self, f"{name}_bias", nn.initializers.zeros, (vocab,), ("vocab",))
        logits = dense(x, w.astype(x.dtype)) + b.astype(x.dtype)
        return constrain(logits.astype(jnp.float32), ("act_batch", "act_length", "act_vocab"))

    @nn.compact
    def __call__(self, stream_ids, start=0, heads="split"):
        cfg = self.cfg
        if not self.decode and not (isinstance(start, int) and start == 0):
            raise ValueError(
                "without decode the call covers the stream from position 0; start "
                f"must be the int 0, got {start!r}"
            )
        if heads not in ("split", "image"):
            raise ValueError(f"heads must be 'split' or 'image', got {heads!r}")
        if heads == "split" and stream_ids.shape[1] != cfg.seq_len:
            raise ValueError(
                f"heads='split' needs the whole stream of {cfg.seq_len} positions, got {stream_ids.shape[1]}"
            )
        table, index = masks_lib.mask_table(
            cfg.layer_kinds, cfg.text_len, cfg.image_grid, cfg.conv_kernel, cfg.legacy_masks
        )
        x = self._embed(stream_ids, start)
        stack = layer_stack(
            Block,
            cfg.num_layers,
            scan=cfg.scan_layers,
            unroll=cfg.scan_unroll,
            remat="none" if self.decode else cfg.remat,
            per_layer_argnums=(1,),
            cfg=cfg,
            decode=self.decode,
        )
        x = stack(x, jnp.asarray(table), jnp.asarray(index), jnp.asarray(start, jnp.int32))
        x = LayerNorm(dtype_of(cfg.dtype), name="ln_final")(x)
        if heads == "image":
            return self._head("image_head", x, cfg.image_vocab_size)
        return (
            self._head("text_head", x[:, : cfg.text_len], cfg.total_text_vocab),
            self._head("image_head", x[:, cfg.text_len :], cfg.image_vocab_size),
        )


# Decoding unrolls up to this many layers (see `dalle_jax.sampling`); deeper models decode through
# the scan, whose compile time stays bounded.
MAX_UNROLLED_LAYERS = 24


def unscan_params(params, num_layers: int):
    """Scanned params (`layers/scan/block/...` with a leading layer axis) -> the unrolled layout
    (`layers/layer_i/...`) of the same model with scan_layers=False."""
    stacked = params["layers"]["scan"]["block"]
    layers = {f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers)}
    return dict(params, layers=layers)


def init_params(cfg: DalleConfig, rng: jax.Array, batch: int = 1):
    """Boxed (logically partitioned) params; wrap in jax.eval_shape for an abstract build."""
    ids = jnp.zeros((batch, cfg.seq_len), jnp.int32)
    return DalleTransformer(cfg).init(rng, ids)["params"]


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token CE in nats: float32 logits [..., V], int targets [...]."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def loss_and_metrics(
    params,
    cfg: DalleConfig,
    text,
    image_tokens,
    *,
    text_loss_weight: float,
    image_loss_weight: float,
    text_row_weight=None,
    row_weight=None,
    text_divisor=None,
):
    """Weighted text + image cross-entropy of a batch (text [B, Lt], image_tokens [B, n_image]).

    `text_row_weight` [B] drops rows from the text term (caption-dropped rows predict nothing
    useful); `row_weight` [B] masks padding rows out of everything (eval batches). `text_divisor`
    replaces the text term's divisor (this batch's kept rows), e.g. with a larger batch's count.
    """
    batch = text.shape[0]
    rows = jnp.ones((batch,), jnp.float32) if row_weight is None else row_weight.astype(jnp.float32)
    text_rows = rows if text_row_weight is None else rows * text_row_weight.astype(jnp.float32)
    text_logits, image_logits = DalleTransformer(cfg).apply(
        {"params": params}, input_stream(text, image_tokens)
    )
    text_ce = cross_entropy(text_logits, text).mean(-1)
    image_ce = cross_entropy(image_logits, image_tokens).mean(-1)
    if text_divisor is None:
        text_divisor = jnp.maximum(text_rows.sum(), 1.0)
    text_loss = (text_ce * text_rows).sum() / text_divisor
    image_loss = (image_ce * rows).sum() / jnp.maximum(rows.sum(), 1.0)
    loss = text_loss_weight * text_loss + image_loss_weight * image_loss
    metrics = {
        "text_loss": text_loss,
        "image_loss": image_loss,
        "image_bits_per_dim": image_loss / math.log(2.0),
    }  # per image token
    return loss, metrics


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(tree))))


def flops_per_example(cfg: DalleConfig) -> float:
    """Forward + backward FLOPs of one stream (3x the forward's matmul FLOPs; dense attention,
    masked entries included since they are computed)."""
    t, d, layers = cfg.seq_len, cfg.d_model, cfg.num_layers
    inner = cfg.num_heads * cfg.head_dim
    per_layer = 2 * t * (3 * d * inner + inner * d + 2 * d * cfg.mlp_dim) + 2 * 2 * t * t * inner
    heads = 2 * (cfg.text_len * d * cfg.total_text_vocab + cfg.num_image_tokens * d * cfg.image_vocab_size)
    return 3.0 * (layers * per_layer + heads)
