"""CLIP as a trainer Task: preprocessing, init, the contrastive loss and the evaluator hook."""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np

from core_jax.config import ConfigError
from core_jax.data import image_ops
from core_jax.trainer import Evaluator, Task

from clip_jax import losses
from clip_jax.model import CLIP, clip_from_config, train_flops_per_example

# config.eval.evaluators names -> "module:Class"; each class is built as Class(config, workdir) and
# exposes `.name` and `.fn(params, step) -> dict`. Imported lazily: evaluators may need extra data.
EVALUATORS = {
    "zeroshot": "clip_jax.zeroshot:ZeroShotEvaluator",
    "retrieval": "clip_jax.retrieval:RetrievalEvaluator",
}


def make_tokenizer(config, workdir: str | None):
    from core_jax.text import tokenizer_from_config
    tokenizer = tokenizer_from_config(config.text, workdir, data_source=config.data.source)
    if tokenizer.vocab_size > int(config.text.vocab_size):
        raise ConfigError(f"the tokenizer ({tokenizer.path}) has {tokenizer.vocab_size} tokens but "
                          f"config.text.vocab_size={config.text.vocab_size}; raise text.vocab_size")
    if tokenizer.pad_mode != "zeros":
        raise ConfigError(f"CLIP reads features at the largest token id, so text.pad_mode must be "
                          f"'zeros', got {tokenizer.pad_mode!r}")
    return tokenizer


def make_example_fns(config, tokenizer):
    """(train example_fn, eval example_fn): uint8 image -> CLIP-normalised float32, caption -> ids."""
    from core_jax.text import training_tokenizer
    size = int(config.model.image_size)
    tokenizers = {True: training_tokenizer(tokenizer, config.text), False: tokenizer}

    def example_fn(raw, rng, train=True):
        image = image_ops.resize_and_crop(raw["image"], size,
                                          random_crop=train and bool(config.data.random_crop), rng=rng)
        if train and config.data.random_flip:
            # Flips are off by default: they break captions that say "left of" / "right of".
            image = image_ops.maybe_flip(image, rng)
        captions = raw.get("captions") or [raw["caption"]]
        caption = captions[int(rng.integers(len(captions)))] if train else raw["caption"]
        return {"image": image_ops.clip_normalize(np.ascontiguousarray(image)),
                "text": tokenizers[train].encode([caption])[0]}

    return example_fn, lambda raw, rng: example_fn(raw, rng, train=False)


def make_loss_fn(model: CLIP, loss_kind: str):
    def loss_fn(params, batch, rng, step):
        del rng, step  # deterministic model (no dropout)
        features = model.apply({"params": params}, batch["image"], batch["text"])
        loss, metrics = losses.contrastive_loss(loss_kind, features)
        metrics = dict(metrics, temperature=features["scale"])
        if loss_kind.startswith("sigmoid"):
            metrics["logit_bias"] = features["bias"]
        return loss, metrics
    return loss_fn


def make_evaluators(config, workdir: str) -> list[Evaluator]:
    names = [n.strip() for n in str(config.eval.get("evaluators", "") or "").split(",") if n.strip()]
    out = []
    for name in names:
        if name not in EVALUATORS:
            raise ConfigError(f"config.eval.evaluators: unknown evaluator {name!r}; "
                              f"known: {sorted(EVALUATORS)}")
        module_name, cls_name = EVALUATORS[name].split(":")
        evaluator = getattr(importlib.import_module(module_name), cls_name)(config, workdir)
        out.append(Evaluator(name=evaluator.name, fn=evaluator.fn))
    return out


def make_task(config, workdir: str) -> Task:
    if int(config.data.image_size) != int(config.model.image_size):
        # The data pipeline and the model would silently disagree about the resolution.
        raise ConfigError(f"config.data.image_size={config.data.image_size} differs from "
                          f"config.model.image_size={config.model.image_size}")
    try:
        model = clip_from_config(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    abstract_only = workdir is None  # core_jax.aot: shapes only, no tokenizer or eval data
    example_fn = eval_example_fn = None
    if not abstract_only:
        tokenizer = make_tokenizer(config, workdir)
        example_fn, eval_example_fn = make_example_fns(config, tokenizer)

    def init_fn(rng, batch):
        return model.init({"params": rng}, batch["image"][:1], batch["text"][:1])

    def batch_spec(batch_size):
        size, length = int(config.model.image_size), int(config.text.context_length)
        return {"image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
                "text": jax.ShapeDtypeStruct((batch_size, length), jnp.int32)}

    return Task(
        init_fn=init_fn,
        loss_fn=make_loss_fn(model, config.model.loss),
        example_fn=example_fn,
        eval_example_fn=eval_example_fn,
        flops_per_example=train_flops_per_example(model.cfg),
        evaluators=[] if abstract_only else make_evaluators(config, workdir),
        batch_spec=batch_spec,
    )

