"""CLIP as a trainer Task: preprocessing, init, the contrastive loss and the evaluator hook."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import losses
from clip_jax.clip_models import clip_from_config
from clip_jax.model import CLIP, train_flops_per_example
from core_jax.data import image_ops
from core_jax.errors import ConfigError
from core_jax.text import tokenizer_from_config, training_tokenizer
from core_jax.trainer import Evaluator, Task, merge_micro, split_micro

# config.eval.evaluators names -> "module:Class"; each class is built as Class(config, workdir) and
# exposes `.name` and `.fn(params, step) -> dict`. Imported lazily: evaluators may need extra data.
EVALUATORS = {
    "zeroshot": "clip_jax.zeroshot:ZeroShotEvaluator",
    "retrieval": "clip_jax.retrieval:RetrievalEvaluator",
}


def make_tokenizer(config, workdir: str | None):
    tokenizer = tokenizer_from_config(config.text, workdir, data_source=config.data.source)
    if tokenizer.vocab_size > int(config.text.vocab_size):
        raise ConfigError(
            f"the tokenizer ({tokenizer.path}) has {tokenizer.vocab_size} tokens but "
            f"config.text.vocab_size={config.text.vocab_size}; raise text.vocab_size"
        )
    if tokenizer.pad_mode != "zeros":
        raise ConfigError(
            f"CLIP reads features at the largest token id, so text.pad_mode must be "
            f"'zeros', got {tokenizer.pad_mode!r}"
        )
    return tokenizer


def make_example_fns(config, tokenizer):
    """(train example_fn, eval example_fn): uint8 image -> CLIP-normalised float32, caption -> ids."""
    size = int(config.model.image_size)
    resize_range = tuple(config.data.get("random_resize_range", (1.0, 1.0)))
    tokenizers = {True: training_tokenizer(tokenizer, config.text), False: tokenizer}

    def example_fn(raw, rng, train=True):
        image = image_ops.resize_and_crop(
            raw["image"],
            size,
            random_crop=train and bool(config.data.random_crop),
            rng=rng,
            resize_range=resize_range,
        )
        if train and config.data.random_flip:
            # Flips are off by default: they break captions that say "left of" / "right of".
            image = image_ops.maybe_flip(image, rng)
        captions = raw.get("captions") or [raw["caption"]]
        caption = captions[int(rng.integers(len(captions)))] if train else raw["caption"]
        return {
            "image": image_ops.clip_normalize(np.ascontiguousarray(image)),
            "text": tokenizers[train].encode([caption])[0],
        }

    return example_fn, lambda raw, rng: example_fn(raw, rng, train=False)


def _loss_from_features(loss_kind: str, features: dict):
    loss, metrics = losses.contrastive_loss(loss_kind, features)
    metrics = dict(metrics, temperature=features["scale"])
    if loss_kind.startswith("sigmoid"):
        metrics["logit_bias"] = features["bias"]
    return loss, metrics


def make_loss_fn(model: CLIP, loss_kind: str):
    def loss_fn(params, batch, rng, step):
        del rng, step  # deterministic model (no dropout)
        features = model.apply({"params": params}, batch["image"], batch["text"])
        return _loss_from_features(loss_kind, features)

    return loss_fn


def make_accum_grads_fn(model: CLIP, loss_kind: str):
    """Gradient accumulation that keeps the contrastive loss over the whole batch (open_clip's
    --accum-freq): every negative of the full batch is in every softmax / sigmoid sum.

    Pass 1 embeds each micro-batch without gradients and takes the loss, and its cotangent with
    respect to the features, over all of them at once (features are [B, E], small next to the
    towers' activations). Pass 2 runs each micro-batch's towers again with gradients and pulls its
    slice of that cotangent back to the params. The sum over micro-batches is the full batch's
    gradient, since the loss depends on the tower params only through the features; the logit
    scale and bias get theirs once, from the loss. Costs one extra forward per micro-batch.
    """
    towers = lambda params, mb: model.apply(  # noqa: E731
        {"params": params},
        mb["image"],
        mb["text"],
        method=lambda m, images, tokens: (m.encode_image(images), m.encode_text(tokens)),
    )

    def accum_grads_fn(params, batch, rng, step, accum):
        del rng, step  # deterministic model (no dropout)
        micro = split_micro(batch, accum)
        # Back in the batch's own row order (and its sharding): pairs stay pairs, and the logits
        # matrix (so the accuracy metrics too) is the full batch's.
        image, text = merge_micro(jax.lax.map(lambda mb: towers(params, mb), micro))

        def loss_of(image, text, params):
            scale, bias = model.apply({"params": params}, method=lambda m: (m.temperature(), m.bias()))
            return _loss_from_features(
                loss_kind, {"image": image, "text": text, "scale": scale, "bias": bias}
            )

        loss, pull, metrics = jax.vjp(loss_of, image, text, params, has_aux=True)
        d_image, d_text, head_grads = pull(jnp.ones_like(loss))
        cotangents = split_micro((d_image, d_text), accum)

        def body(grads, xs):
            mb, ct = xs
            _, pull_mb = jax.vjp(lambda p: towers(p, mb), params)
            return jax.tree.map(jnp.add, grads, pull_mb(ct)[0]), None

        grads, _ = jax.lax.scan(body, head_grads, (micro, cotangents))
        return loss, metrics, grads

    return accum_grads_fn


def make_evaluators(config, workdir: str) -> list[Evaluator]:
    names = [n.strip() for n in str(config.eval.get("evaluators", "") or "").split(",") if n.strip()]
    out = []
    for name in names:
        if name not in EVALUATORS:
            raise ConfigError(
                f"config.eval.evaluators: unknown evaluator {name!r}; known: {sorted(EVALUATORS)}"
            )
        module_name, cls_name = EVALUATORS[name].split(":")
        evaluator = getattr(importlib.import_module(module_name), cls_name)(config, workdir)
        out.append(Evaluator(name=evaluator.name, fn=evaluator.fn))
    return out


def make_task(config, workdir: str) -> Task:
    if int(config.data.image_size) != int(config.model.image_size):
        # The data pipeline and the model would silently disagree about the resolution.
        raise ConfigError(
            f"config.data.image_size={config.data.image_size} differs from "
            f"config.model.image_size={config.model.image_size}"
        )
    try:
        model = clip_from_config(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    abstract_only = workdir is None  # core_jax.aot: shapes only, no tokenizer or eval data
    example_fn = None
    if not abstract_only:
        example_fn, _ = make_example_fns(config, make_tokenizer(config, workdir))

    def init_fn(rng, batch):
        return model.init({"params": rng}, batch["image"][:1], batch["text"][:1])

    def batch_spec(batch_size):
        size, length = int(config.model.image_size), int(config.text.context_length)
        return {
            "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
            "text": jax.ShapeDtypeStruct((batch_size, length), jnp.int32),
        }

    return Task(
        init_fn=init_fn,
        loss_fn=make_loss_fn(model, config.model.loss),
        accumulation="global",
        accum_grads_fn=make_accum_grads_fn(model, config.model.loss),
        example_fn=example_fn,
        flops_per_example=train_flops_per_example(model.cfg),
        evaluators=[] if abstract_only else make_evaluators(config, workdir),
        batch_spec=batch_spec,
    )
