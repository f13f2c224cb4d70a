"""Zero-shot classification: class names + prompt templates -> a linear classifier on images.

OpenAI's protocol: each class's weight is the mean of its L2-normalised template embeddings,
renormalised; logits = 100 * image . W; top-1 and top-5 (ties broken towards the lower class index,
as torch.topk / lax.top_k do), and top-1 per true class. Runs on the shapes suite (one-object
scenes, 18 colour-shape classes) or on any TFDS classification dataset (ImageNet:
`zeroshot_name=imagenet2012`).
"""

from __future__ import annotations

import collections
import functools
import os
import re
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import eval_common as ev
from clip_jax.imagenet_classes import IMAGENET_CLASSNAMES, OPENAI_TEMPLATES, SUBSET7_TEMPLATES
from core_jax import storage
from core_jax.data.config import with_defaults
from core_jax.data.shapes import CLASS_NAMES, POSITIONS, SPLITS, ShapesSource
from core_jax.trainer import host_eval_batches

ZEROSHOT_LOGIT_SCALE = 100.0
TOPK = (1, 5)


def _shapes_templates() -> tuple[str, ...]:
    # The shapes captions name a position ("a red circle in the top left"); averaging over the five
    # positions matches the training captions' form while leaving the position out of the class.
    return tuple(f"a {{}} in the {p}" for p in POSITIONS)


TEMPLATE_SETS = {
    "openai80": lambda: OPENAI_TEMPLATES,
    "subset7": lambda: SUBSET7_TEMPLATES,
    "shapes": _shapes_templates,
    "photo": lambda: ("a photo of a {}.",),
}

_WORDNET_ID = re.compile(r"^n\d{8}$")


def resolve_templates(spec: str) -> list[str]:
    """A template set name or a file with one template per line; each holds exactly one '{}'."""
    if spec in TEMPLATE_SETS:
        templates = list(TEMPLATE_SETS[spec]())
    elif os.path.sep in spec or storage.is_remote(spec) or storage.isfile(spec):
        templates = ev.read_lines(spec, "templates")
    else:
        raise ValueError(f"templates={spec!r} is neither one of {sorted(TEMPLATE_SETS)} nor a file")
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"template {t!r} must contain '{{}}' exactly once (where the class name goes)")
    return templates


def resolve_classnames(spec: str, dataset_names: Sequence[str] | None = None) -> list[str]:
    """'' = the dataset's names, 'imagenet' = the shipped cleaned list, else a file (one per line).

    ImageNet in TFDS names its labels by WordNet id (n01440764, ...); '' then takes the cleaned
    list, since "a photo of a n01440764." would be meaningless to the text tower.
    """
    if spec == "imagenet":
        return list(IMAGENET_CLASSNAMES)
    if spec:
        return ev.read_lines(spec, "classnames")
    if not dataset_names:
        raise ValueError(
            "classnames='' takes the names from the dataset, but it has none; "
            "set config.eval.classnames to 'imagenet' or a file with one name per "
            "line"
        )
    names = [str(n) for n in dataset_names]
    if len(names) == len(IMAGENET_CLASSNAMES) and all(_WORDNET_ID.match(n) for n in names):
        return list(IMAGENET_CLASSNAMES)
    return [n.replace("_", " ") for n in names]


def class_embeddings(encoder, classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """[C, E] float32: per class, the renormalised mean of its normalised template embeddings."""
    if not classnames:
        raise ValueError("no class names")
    texts = [t.format(c) for c in classnames for t in templates]
    emb = np.asarray(encoder.embed_texts(texts), np.float32)
    emb = emb.reshape(len(classnames), len(templates), -1)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)  # idempotent for normalised encoders
    mean = emb.mean(axis=1)
    return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("ks",))
def topk_hits(image_emb, class_weights, labels, mask, ks: tuple[int, ...] = TOPK):
    """Counts over the masked rows of a batch: {'top{k}': #(label among the top k), 'count'},
    and per class (int [C], indexed by the true label) 'class_count' and 'class_top1'.

    k larger than the number of classes is clamped (top-5 of 3 classes is always a hit).
    """

    logits = ZEROSHOT_LOGIT_SCALE * jnp.einsum(
        "be,ce->bc", image_emb.astype(jnp.float32), class_weights.astype(jnp.float32)
    )
    kmax = min(max(ks), logits.shape[-1])
    _, top = jax.lax.top_k(logits, kmax)
    hit = top == labels[:, None].astype(top.dtype)
    out = {"count": jnp.sum(mask.astype(jnp.int32))}
    for k in ks:
        out[f"top{k}"] = jnp.sum(jnp.any(hit[:, : min(k, kmax)], axis=-1) & mask)
    # A one-hot sum rather than a scatter: it splits over the batch's shards like the counts above.
    is_class = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.int32) * mask[:, None]
    out["class_count"] = jnp.sum(is_class, axis=0)
    out["class_top1"] = jnp.sum(is_class * hit[:, :1], axis=0)
    return out


def evaluate_batches(
    encoder,
    batches: Iterable[dict],
    class_weights: np.ndarray,
    *,
    max_examples: int = 0,
    ks: tuple[int, ...] = TOPK,
    classnames: Sequence[str] | None = None,
) -> dict:
    """Top-k accuracies (fractions) over the real (`_mask`) rows of `batches` ({'image', 'label'}):
    {'top1', 'top5', 'num_examples', 'per_class'}, where 'per_class' is `per_class_top1`'s table
    (keyed by `classnames`, else by the label as a string).

    `max_examples` caps the examples counted: each process counts at most
    ceil(max_examples / process_count) of its rows, and all stop together once the global count
    reaches the cap (a decision every process takes from the same global number).
    """
    totals = {f"top{k}": 0 for k in ks}
    count = 0
    class_count = class_top1 = np.zeros(len(class_weights), np.int64)
    local_cap = -(-max_examples // jax.process_count()) if max_examples else 0
    local_seen = 0
    for batch in batches:
        labels = np.asarray(batch["label"], np.int32)
        mask = np.asarray(batch.get("_mask", np.ones(len(labels), bool)), bool)
        if local_cap:
            mask = mask & (local_seen + np.cumsum(mask) <= local_cap)
        if mask.any() and labels[mask].min() < 0:
            raise ValueError("zero-shot needs labelled images, but the dataset yields label -1")
        local_seen += int(mask.sum())
        emb = encoder.embed_images(batch["image"])
        hits = topk_hits(
            emb, class_weights, ev.put_rows(encoder, labels), ev.put_rows(encoder, mask), ks=tuple(ks)
        )
        hits = jax.device_get(hits)
        count += int(hits["count"])
        for key in totals:
            totals[key] += int(hits[key])
        class_count = class_count + hits["class_count"]
        class_top1 = class_top1 + hits["class_top1"]
        if max_examples and count >= max_examples:
            break
    if count == 0:
        raise ValueError("zero-shot evaluation saw no examples")
    out = {key: hits / count for key, hits in totals.items()}
    out["num_examples"] = count
    if classnames is None:
        classnames = [str(c) for c in range(len(class_weights))]
    out["per_class"] = per_class_top1(class_top1, class_count, classnames)
    return out


def per_class_top1(class_top1, class_count, classnames: Sequence[str]) -> dict:
    """{name: {'top1': fraction, 'count': images}} for every class with images, in label order.

    A class without images has no accuracy and is left out. A name listed more than once (ImageNet
    lists "missile" and "sunglasses" twice) is keyed "name (label)" at each of its labels.
    """
    names = list(classnames)
    if len(names) != len(class_count):
        raise ValueError(f"{len(names)} class names for {len(class_count)} classes")
    repeated = {n for n, k in collections.Counter(names).items() if k > 1}
    table = {}
    for label, (name, hits, n) in enumerate(zip(names, class_top1, class_count)):
        if n > 0:
            key = f"{name} ({label})" if name in repeated else name
            table[key] = {"top1": int(hits) / int(n), "count": int(n)}
    return table


def format_per_class(table: dict) -> str:
    """The per-class table, one line per class ('top1  count  class'), worst top-1 first."""
    rows = sorted(table.items(), key=lambda kv: kv[1]["top1"])  # stable: ties keep label order
    lines = [f"{'top1':>8} {'count':>7}  class"]
    lines += [f"{r['top1']:8.4f} {r['count']:7d}  {name}" for name, r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Data.


def check_eval_config(config) -> None:
    """The eval settings that can be checked without a model or data (clear errors up front)."""
    e = config.eval
    if e.zeroshot_source not in ("", "shapes", "tfds"):
        raise ValueError(
            f"config.eval.zeroshot_source must be 'shapes', 'tfds' or '', got {e.zeroshot_source!r}"
        )
    if e.zeroshot_source == "shapes" and e.zeroshot_split not in SPLITS:
        raise ValueError(
            f"config.eval.zeroshot_split={e.zeroshot_split!r} is not a shapes split; use one of {SPLITS}"
        )
    if e.zeroshot_source:
        resolve_templates(default_templates(e))
        if e.classnames and e.classnames != "imagenet":
            ev.read_lines(e.classnames, "classnames")
    if int(e.batch_size) <= 0 or int(e.max_examples) < 0:
        raise ValueError("config.eval.batch_size must be > 0 and config.eval.max_examples >= 0")


def default_templates(eval_cfg) -> str:
    """'' = the source's default: the CLIP paper's 80-prompt ImageNet ensemble (Radford et al. 2021,
    section 3.1.4) for TFDS, so published zero-shot numbers reproduce; `shapes` for the shapes suite.
    OpenAI's 7-template subset stays available as templates='subset7'."""
    if eval_cfg.templates:
        return eval_cfg.templates
    return "shapes" if eval_cfg.zeroshot_source == "shapes" else "openai80"


def _image_label_example_fn(image_size: int):
    def example_fn(raw, rng=None):
        return {"image": ev.sized_image(raw["image"], image_size), "label": np.int32(raw["label"])}

    return example_fn


def zeroshot_data(config, image_size: int, batch_size: int, skipped: dict | None = None):
    """(batches, dataset class names) for `config.eval`'s zero-shot source, one pass, masked;
    close the batches when done early. `skipped` (a dict) receives the skipped-example counts.

    Shapes batches already stop at `max_examples`; TFDS batches are capped by the caller.
    """
    e = config.eval
    example_fn = _image_label_example_fn(image_size)
    if e.zeroshot_source == "shapes":
        source = ShapesSource(e.zeroshot_split, one_object_only=True)
        n = min(len(source), int(e.max_examples)) if e.max_examples else len(source)
        batches = ev.padded_batches(
            n,
            lambda i: example_fn(source[i]),
            batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            skipped=skipped,
        )
        return batches, list(CLASS_NAMES)
    if e.zeroshot_source == "tfds":
        data_cfg = with_defaults(config.data)  # a copy with every key
        data_cfg.source, data_cfg.name = "tfds", e.zeroshot_name
        data_cfg.split = data_cfg.eval_split = e.zeroshot_split
        data_cfg.data_dir = e.zeroshot_data_dir or data_cfg.data_dir
        data_cfg.label_key, data_cfg.caption_key = e.zeroshot_label_key, ""
        names = tfds_label_names(e.zeroshot_name, data_cfg.data_dir, e.zeroshot_label_key)
        batches = host_eval_batches(
            data_cfg, e.zeroshot_split, example_fn, batch_size=batch_size, skipped=skipped
        )
        return batches, names
    raise ValueError(f"config.eval.zeroshot_source={e.zeroshot_source!r}; use 'shapes' or 'tfds'")


def tfds_label_names(name: str, data_dir: str, label_key: str) -> list[str] | None:
    """The builder's label names (info.features[label_key].names); None when it has none."""
    import tensorflow_datasets as tfds  # lazy: heavy, and only TFDS data needs it

    try:
        feature = tfds.builder(name, data_dir=data_dir or None).info.features[label_key]
    except KeyError:
        raise ValueError(
            f"TFDS {name} has no feature {label_key!r} (set config.eval.zeroshot_label_key)"
        ) from None
    return list(getattr(feature, "names", None) or []) or None


def run_zeroshot(config, encoder, log=print) -> dict:
    """Zero-shot top-1/top-5 of `encoder` on the dataset `config.eval` names, and its per-class
    top-1 table ('per_class', see `evaluate_batches`); logs a summary line and the table.

    On the shapes suite also 'min_class_top1', the worst class's top-1: the suite's target holds
    for every class (over ImageNet's 1000 classes of 50 images the worst one says little).
    """
    config = ev.with_eval_defaults(config)
    check_eval_config(config)
    e = config.eval
    batch_size = ev.round_batch_size(e.batch_size, ev.encoder_batch_multiple(encoder))
    skipped = {}
    batches, dataset_names = zeroshot_data(config, int(encoder.image_size), batch_size, skipped)
    classnames = resolve_classnames(e.classnames, dataset_names)
    templates = resolve_templates(default_templates(e))
    weights = class_embeddings(encoder, classnames, templates)
    cap = 0 if e.zeroshot_source == "shapes" else int(e.max_examples)
    try:
        result = evaluate_batches(encoder, batches, weights, max_examples=cap, classnames=classnames)
    finally:
        batches.close()
    if e.zeroshot_source == "shapes":
        result["min_class_top1"] = min(r["top1"] for r in result["per_class"].values())
    if skipped:
        log(f"zeroshot: skipped examples {skipped}")
    log(
        f"zeroshot {e.zeroshot_source}:{e.zeroshot_split}: {len(classnames)} classes x "
        f"{len(templates)} templates, {result['num_examples']} images: "
        f"top1={result['top1']:.4f} top5={result['top5']:.4f}"
    )
    log(
        f"zeroshot per class, worst first ({len(result['per_class'])} of {len(classnames)} classes "
        f"have images):\n{format_per_class(result['per_class'])}"
    )
    return result


class ZeroShotEvaluator:
    """Trainer evaluator: `fn(params, step) -> {'top1', 'top5', 'num_examples'}` (fractions), with
    'min_class_top1' on the shapes suite; the per-class table stays out (the trainer logs scalars).

    The classifier is rebuilt from the current params on every call (the text tower trains too).
    """

    name = "zeroshot"

    def __init__(self, config, workdir: str | None = None, tokenizer=None):
        self.config = ev.with_eval_defaults(config)
        check_eval_config(self.config)
        self.workdir, self.tokenizer = workdir, tokenizer

    def fn(self, params, step: int) -> dict:
        encoder = ev.ParamsEncoder(self.config, params, self.workdir, tokenizer=self.tokenizer)
        result = run_zeroshot(self.config, encoder, log=lambda m: None)
        return {k: v for k, v in result.items() if k != "per_class"}
