"""unCLIP's diffusion prior network (Ramesh et al. 2022, arXiv 2204.06125, section 2.2): a
decoder-only causal transformer from a caption to the clean CLIP image embedding.

Section 2.2: "a decoder-only Transformer with a causal attention mask on a sequence consisting of,
in order: the encoded text, the CLIP text embedding, an embedding for the diffusion timestep, the
noised CLIP image embedding, and a final embedding whose output from the Transformer is used to
predict the unnoised CLIP image embedding". Here the encoded text is the caption's per-token states
from the frozen CLIP text tower (`clip_jax.model.encode_text_tokens`), projected to the width; its
padding is hidden from every position by a per-example key mask. Positions, for L caption tokens:

    0 .. L-1  caption tokens      L  text embedding      L+1  timestep
    L+2       noised image embedding                      L+3  query -> the x0 prediction

Blocks are core_jax.layers' pre-LayerNorm attention + MLP (query/key/value attention with float32
logits, float32-statistics LayerNorms: the DALL-E transformer's flavour), stacked by layer_stack.

The first L+1 positions (the prefix) do not depend on the timestep or the noised embedding, and
the mask is causal, so their keys and values are the same at every sampling step: `prefix` runs
them once per caption into a KV cache and `suffix` runs only the last three positions against it
(`dalle_jax.unclip.prior_sample`). Dropping the caption for guidance (section 2.2: "randomly
dropping this text conditioning information 10% of the time") masks every caption token and puts
a learned null token in the text embedding's place (`caption_kept` = 0).

Everything the shapes depend on is `PriorSpec`; `param_count` and `train_flops_per_example` count
a spec on paper, so the paper's 1B config is sized without building it.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from core_jax.errors import ConfigError
from core_jax.layers import MLP, Attention, LayerNorm, normal, param
from core_jax.modeling import REMAT_POLICIES, constrain, dense, dtype_of, layer_stack
from dalle_jax.unclip.unet import timestep_embedding

SUFFIX = 3  # timestep, noised image embedding, query: the positions every sampling step runs
ACT = ("act_batch", "act_length", "act_embed")
EMBED_STD = 0.02  # learned positions, null and query tokens (GPT-2's embedding init)


@dataclasses.dataclass(frozen=True)
class PriorSpec:
    """The prior's shapes and computation, frozen so linen modules can hold it."""

    width: int  # model width d
    num_layers: int
    num_heads: int  # head dim = width / num_heads
    clip_dim: int  # CLIP embedding width E (image and text embeddings)
    text_width: int  # the CLIP text tower's token-state width
    text_length: int  # L, the CLIP context: caption tokens in the sequence
    mlp_ratio: float = 4.0  # MLP hidden width / width
    dtype: str = "float32"  # compute dtype; params stay float32
    remat: str = "none"
    scan_layers: bool = True

    # The prior has no dropout (unCLIP Table 3 lists none); the shared diffusion loss helpers
    # (dalle_jax/unclip/diffusion_task.py) read this like a U-Net's spec.dropout.
    dropout = 0.0

    @property
    def prefix_length(self) -> int:
        """Caption tokens and the text embedding: the positions the KV cache holds."""
        return self.text_length + 1

    @property
    def seq_length(self) -> int:
        return self.prefix_length + SUFFIX

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(round(self.mlp_ratio * self.width))


def check_spec(spec: PriorSpec) -> PriorSpec:
    """The spec, or a ConfigError naming the first size that cannot build."""
    for name in ("width", "num_layers", "num_heads", "clip_dim", "text_width", "text_length"):
        if int(getattr(spec, name)) <= 0:
            raise ConfigError(f"config.model.{name} must be positive, got {getattr(spec, name)}")
    if spec.width % spec.num_heads:
        raise ConfigError(f"config.model.width={spec.width} is not divisible by num_heads={spec.num_heads}")
    if spec.mlp_dim <= 0:
        raise ConfigError(f"config.model.mlp_ratio must be positive, got {spec.mlp_ratio}")
    if spec.remat not in REMAT_POLICIES:
        raise ConfigError(f"config.remat must be one of {', '.join(REMAT_POLICIES)}, got {spec.remat!r}")
    try:
        dtype_of(spec.dtype)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return spec


class Block(nn.Module):
    """Pre-LayerNorm causal attention (with each example's key mask) + MLP."""

    spec: PriorSpec
    decode: bool = False

    @nn.compact
    def __call__(self, x, key_mask, start):
        s, dtype = self.spec, dtype_of(self.spec.dtype)
        depth = math.sqrt(2 * s.num_layers)  # residual-branch outputs start smaller in deep stacks
        attn = Attention(
            num_heads=s.num_heads,
            out_std=1.0 / math.sqrt(s.width) / depth,
            causal=True,
            in_std=1.0 / math.sqrt(s.width),
            names=("query", "key", "value"),
            float32_logits=True,
            cache_length=s.seq_length if self.decode else 0,
            dtype=dtype,
            name="attn",
        )
        x = x + attn(LayerNorm(dtype, name="ln_attn")(x), None, start, key_mask=key_mask)
        x = constrain(x, ACT)
        mlp = MLP(
            mlp_dim=s.mlp_dim,
            activation="gelu",
            names=("in", "out"),
            in_std=1.0 / math.sqrt(s.width),
            out_std=1.0 / math.sqrt(s.mlp_dim) / depth,
            dtype=dtype,
            name="mlp",
        )
        x = x + mlp(LayerNorm(dtype, name="ln_mlp")(x))
        return constrain(x, ACT)


class PriorTransformer(nn.Module):
    """`__call__(x_t, t, *, text_states, text_mask, text_embedding, caption_kept=None)` -> the
    predicted clean embedding, float32 [B, E] (the whole sequence in one pass).

    x_t: float32 [B, E], the noised (standardised) image embedding; t: [B] diffusion steps;
    text_states: [B, L, text_width]; text_mask: bool [B, L] (True = a caption token to read);
    text_embedding: [B, E] (standardised); caption_kept: [B], 0 where the caption is dropped (the
    guidance null), None = all kept. With `decode=True` the same computation is split in two:
    `prefix(text_states, text_mask, text_embedding, caption_kept)` fills the 'cache' collection
    and returns the key mask [B, L + 4], then `suffix(x_t, t, key_mask)` gives the prediction.
    """

    spec: PriorSpec
    decode: bool = False

    def setup(self):
        s = self.spec
        d, e = s.width, s.clip_dim
        self.text_kernel = param(
            self, "text_kernel", normal(s.text_width**-0.5), (s.text_width, d), ("mlp", "embed")
        )
        self.text_bias = param(self, "text_bias", nn.initializers.zeros, (d,), ("embed",))
        self.text_embedding_kernel = param(
            self, "text_embedding_kernel", normal(e**-0.5), (e, d), ("mlp", "embed")
        )
        self.text_embedding_bias = param(self, "text_embedding_bias", nn.initializers.zeros, (d,), ("embed",))
        self.image_kernel = param(self, "image_kernel", normal(e**-0.5), (e, d), ("mlp", "embed"))
        self.image_bias = param(self, "image_bias", nn.initializers.zeros, (d,), ("embed",))
        self.null_text = param(self, "null_text", normal(EMBED_STD), (d,), ("embed",))
        self.query = param(self, "query", normal(EMBED_STD), (d,), ("embed",))
        self.position = param(self, "position", normal(EMBED_STD), (s.seq_length, d), ("length", "embed"))
        self.time_mlp = MLP(
            mlp_dim=d,
            activation="gelu",
            names=("in", "out"),
            in_std=1.0 / math.sqrt(d),
            out_std=1.0 / math.sqrt(d),
            dtype=dtype_of(s.dtype),
            name="time_mlp",
        )
        self.layers = layer_stack(
            Block,
            s.num_layers,
            scan=s.scan_layers,
            remat="none" if self.decode else s.remat,
            spec=s,
            decode=self.decode,
        )
        self.ln_final = LayerNorm(dtype_of(s.dtype), name="ln_final")
        self.out_kernel = param(self, "out_kernel", normal(d**-0.5), (d, e), ("embed", "mlp"))
        self.out_bias = param(self, "out_bias", nn.initializers.zeros, (e,), ("mlp",))

    def _linear(self, x, kernel, bias):
        dtype = dtype_of(self.spec.dtype)
        return dense(x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)

    def _prefix_tokens(self, text_states, text_mask, text_embedding, caption_kept):
        """(tokens [B, L + 1, d] with their positions, key mask [B, L + 4])."""
        s, batch = self.spec, text_states.shape[0]
        kept = jnp.ones((batch,), bool) if caption_kept is None else jnp.asarray(caption_kept) > 0
        caption = self._linear(text_states, self.text_kernel, self.text_bias)
        embedding = self._linear(text_embedding, self.text_embedding_kernel, self.text_embedding_bias)
        embedding = jnp.where(kept[:, None], embedding, self.null_text.astype(embedding.dtype))
        tokens = jnp.concatenate([caption, embedding[:, None]], axis=1)
        tokens = tokens + self.position[: s.prefix_length].astype(tokens.dtype)
        key_mask = jnp.concatenate(
            [jnp.asarray(text_mask, bool) & kept[:, None], jnp.ones((batch, 1 + SUFFIX), bool)], axis=1
        )
        return constrain(tokens, ACT), key_mask

    def _suffix_tokens(self, x_t, t):
        """The timestep, noised embedding and query tokens [B, 3, d] with their positions."""
        s, dtype = self.spec, dtype_of(self.spec.dtype)
        time = self.time_mlp(timestep_embedding(t, s.width).astype(dtype)[:, None])[:, 0]
        image = self._linear(x_t, self.image_kernel, self.image_bias)
        query = jnp.broadcast_to(self.query.astype(dtype), image.shape)
        tokens = jnp.stack([time, image, query], axis=1)
        return constrain(tokens + self.position[s.prefix_length :].astype(dtype), ACT)

    def _predict(self, x):
        """The x0 prediction, float32 [B, E], from the query position's output."""
        out = self._linear(self.ln_final(x[:, -1]), self.out_kernel, self.out_bias)
        return out.astype(jnp.float32)

    def __call__(
        self, x_t, t, *, text_states, text_mask, text_embedding, caption_kept=None, deterministic=True
    ):
        del deterministic  # no dropout (PriorSpec.dropout); the diffusion loss helpers pass it
        if self.decode:
            raise ValueError("prior: with decode=True run prefix() then suffix()")
        prefix, key_mask = self._prefix_tokens(text_states, text_mask, text_embedding, caption_kept)
        x = jnp.concatenate([prefix, self._suffix_tokens(x_t, t)], axis=1)
        return self._predict(self.layers(x, key_mask, jnp.zeros((), jnp.int32)))

    def prefix(self, text_states, text_mask, text_embedding, caption_kept=None):
        """Writes the prefix's keys and values into the cache; returns the key mask [B, L + 4]."""
        if not self.decode:
            raise ValueError("prior: prefix() needs decode=True")
        tokens, key_mask = self._prefix_tokens(text_states, text_mask, text_embedding, caption_kept)
        self.layers(tokens, key_mask, jnp.zeros((), jnp.int32))
        return key_mask

    def suffix(self, x_t, t, key_mask):
        """The prediction from the last three positions attending to the cached prefix."""
        if not self.decode:
            raise ValueError("prior: suffix() needs decode=True")
        x = self.layers(
            self._suffix_tokens(x_t, t), key_mask, jnp.asarray(self.spec.prefix_length, jnp.int32)
        )
        return self._predict(x)


def example_inputs(spec: PriorSpec, batch: int = 1) -> tuple[tuple, dict]:
    """Zero inputs of the right shapes: (x_t, t), the conditioning keywords."""
    e = spec.clip_dim
    return (jnp.zeros((batch, e), jnp.float32), jnp.zeros((batch,), jnp.int32)), dict(
        text_states=jnp.zeros((batch, spec.text_length, spec.text_width), jnp.float32),
        text_mask=jnp.ones((batch, spec.text_length), bool),
        text_embedding=jnp.zeros((batch, e), jnp.float32),
    )


def init_params(model: PriorTransformer, rng):
    """Boxed params (nn.Partitioned leaves carrying logical names)."""
    args, kwargs = example_inputs(model.spec)
    return PriorTransformer(model.spec).init({"params": rng}, *args, **kwargs)["params"]


def abstract_params(model: PriorTransformer):
    """Shapes / dtypes of the boxed params without allocating them."""
    return jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0))


def param_count(spec: PriorSpec) -> int:
    """Parameters of the network a spec builds, counted on paper (no jax): equal to the built
    model's count (tested on a small spec)."""
    d, e, m, layers = spec.width, spec.clip_dim, spec.mlp_dim, spec.num_layers
    attention = 4 * d * d + 4 * d  # q, k, v, out kernels and biases (heads x head_dim = d)
    mlp = 2 * d * m + m + d
    block = attention + mlp + 2 * 2 * d  # two LayerNorms
    inputs = (spec.text_width + 1) * d + 2 * (e + 1) * d  # caption, text and image projections
    time = 2 * d * d + 2 * d  # the timestep MLP, width -> width -> width
    tokens = spec.seq_length * d + 2 * d  # positions, null text token, query
    output = 2 * d + d * e + e  # final LayerNorm and the projection to the embedding
    return layers * block + inputs + time + tokens + output


def forward_flops(spec: PriorSpec) -> float:
    """Matmul FLOPs (2 per multiply-add) of one forward pass over the whole sequence."""
    n, d, layers = spec.seq_length, spec.width, spec.num_layers
    per_layer = 2 * n * (4 * d * d + 2 * d * spec.mlp_dim) + 2 * 2 * n * n * d
    inputs = 2 * (spec.text_length * spec.text_width * d + 2 * spec.clip_dim * d + 2 * d * d)
    return layers * per_layer + inputs + 2 * d * spec.clip_dim


def train_flops_per_example(spec: PriorSpec) -> float:
    """Forward + backward FLOPs of one training example (3x the forward), for the trainer's MFU."""
    return 3.0 * forward_flops(spec)
