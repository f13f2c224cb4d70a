"""Image-text retrieval: recall@1/5/10 both ways on a captions dataset, as in COCO evaluation.

Image -> text: an image counts as a hit at k if ANY of its captions ranks in the top k among all
captions. Text -> image: every caption is one query whose one correct answer is its own image.
Ranks count the candidates scoring strictly higher than the (best) correct one.
"""

from __future__ import annotations

import numpy as np

from clip_jax import eval_common as ev
from core_jax.data.config import with_defaults
from core_jax.data.decode import SkipExample
from core_jax.trainer import host_eval_batches

RECALL_KS = (1, 5, 10)
CAPTION_BYTES = 400  # per caption, UTF-8; far beyond CLIP's 77-token context


def recall_at_k(
    image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray, ks=RECALL_KS, chunk: int = 1024
) -> dict:
    """{'i2t_r{k}', 't2i_r{k}'} as fractions. `text_image[j]` is the image index of caption j.

    Images without any caption are left out of image->text (they have no correct answer).
    Works in chunks so 5k images x 25k captions never builds the whole similarity matrix.
    """
    image_emb = np.asarray(image_emb, np.float32)
    text_emb = np.asarray(text_emb, np.float32)
    text_image = np.asarray(text_image, np.int64)
    n, m = len(image_emb), len(text_emb)
    if text_image.shape != (m,) or (m and (text_image.min() < 0 or text_image.max() >= n)):
        raise ValueError(
            f"text_image must hold one image index in [0, {n}) per caption "
            f"({m}), got shape {text_image.shape}"
        )
    i2t_rank = np.full(n, np.iinfo(np.int64).max)
    for lo in range(0, n, chunk):
        sim = image_emb[lo : lo + chunk] @ text_emb.T  # [c, M]
        own = text_image[None, :] == np.arange(lo, lo + len(sim))[:, None]
        best = np.where(own, sim, -np.inf).max(axis=1)
        has = own.any(axis=1)
        i2t_rank[lo : lo + len(sim)][has] = (sim > best[:, None]).sum(axis=1)[has]
    t2i_rank = np.empty(m, np.int64)
    for lo in range(0, m, chunk):
        sim = image_emb @ text_emb[lo : lo + chunk].T  # [N, c]
        own = sim[text_image[lo : lo + chunk], np.arange(sim.shape[1])]
        t2i_rank[lo : lo + chunk] = (sim > own[None, :]).sum(axis=0)
    with_captions = i2t_rank != np.iinfo(np.int64).max
    out = {}
    for k in ks:
        hits = i2t_rank[with_captions] < k
        out[f"i2t_r{k}"] = float(np.mean(hits)) if len(hits) else 0.0
        out[f"t2i_r{k}"] = float(np.mean(t2i_rank < k)) if m else 0.0
    return out


# ----------------------------------------------------------------------------------------------
# Data: captions travel through the batch as fixed-size UTF-8 byte rows (numeric, fixed shape).


def encode_captions(captions, max_captions: int, width: int = CAPTION_BYTES):
    """(uint8 [max_captions, width], num_captions) keeping the first `max_captions` captions."""
    out = np.zeros((max_captions, width), np.uint8)
    kept = [c for c in captions if c and c.strip()][:max_captions]
    for i, c in enumerate(kept):
        data = c.strip().encode("utf-8")[:width]
        out[i, : len(data)] = np.frombuffer(data, np.uint8)
    return out, len(kept)


def decode_captions(rows: np.ndarray, count: int) -> list[str]:
    # A multi-byte character cut by the width limit is dropped, not turned into an error.
    return [bytes(r).rstrip(b"\0").decode("utf-8", errors="ignore") for r in rows[: int(count)]]


def retrieval_example_fn(image_size: int, max_captions: int):
    def example_fn(raw, rng=None):
        captions = list(raw.get("captions") or []) or [raw.get("caption", "")]
        rows, count = encode_captions(captions, max_captions)
        if count == 0:
            raise SkipExample("empty_caption")
        return {
            "image": ev.sized_image(raw["image"], image_size),
            "captions": rows,
            "num_captions": np.int32(count),
        }

    return example_fn


def retrieval_data(config, image_size: int, batch_size: int, skipped: dict | None = None):
    """One masked pass over `config.eval.retrieval_split` (close it when done early); `skipped` (a
    dict) receives the skipped-example counts."""
    e = config.eval
    data_cfg = with_defaults(config.data)  # a copy with every key
    data_cfg.eval_split = e.retrieval_split
    example_fn = retrieval_example_fn(image_size, int(e.retrieval_max_captions))
    return host_eval_batches(data_cfg, e.retrieval_split, example_fn, batch_size=batch_size, skipped=skipped)


def embed_dataset(encoder, batches, max_examples: int = 0):
    """(image embeddings [N, E], captions list, caption -> image index) over the real rows."""
    image_emb, captions, text_image = [], [], []
    for batch in batches:
        mask = np.asarray(batch.get("_mask", np.ones(len(batch["image"]), bool)), bool)
        emb = ev.gather_rows(encoder, encoder.embed_images(batch["image"]))
        # Captions and masks are host-local rows: every process needs all of them, in the same
        # process-major order as `gather` returns the embeddings.
        rows, counts, mask = (
            ev.all_rows(batch["captions"]),
            ev.all_rows(batch["num_captions"]),
            ev.all_rows(mask),
        )
        for i in np.flatnonzero(mask):
            if max_examples and len(image_emb) >= max_examples:
                break
            texts = decode_captions(rows[i], counts[i])
            captions.extend(texts)
            text_image.extend([len(image_emb)] * len(texts))
            image_emb.append(emb[i])
        if max_examples and len(image_emb) >= max_examples:
            break
    if not image_emb:
        raise ValueError("retrieval saw no images with captions")
    return np.stack(image_emb), captions, np.asarray(text_image, np.int64)


def run_retrieval(config, encoder, log=print) -> dict:
    config = ev.with_eval_defaults(config)
    e = config.eval
    batch_size = ev.round_batch_size(e.batch_size, ev.encoder_batch_multiple(encoder))
    skipped = {}
    batches = retrieval_data(config, int(encoder.image_size), batch_size, skipped)
    try:
        image_emb, captions, text_image = embed_dataset(encoder, batches, int(e.max_examples))
    finally:
        batches.close()
    text_emb = np.asarray(encoder.embed_texts(captions), np.float32)
    result = recall_at_k(image_emb, text_emb, text_image)
    result["num_images"], result["num_texts"] = len(image_emb), len(captions)
    if skipped:
        log(f"retrieval: skipped examples {skipped}")
    log(
        f"retrieval {config.data.source}:{e.retrieval_split}: {len(image_emb)} images, "
        f"{len(captions)} captions: "
        + " ".join(f"{k}={result[k]:.4f}" for k in sorted(result) if k.startswith(("i2t", "t2i")))
    )
    return result


class RetrievalEvaluator:
    """Trainer evaluator: `fn(params, step)` -> {'i2t_r1', .., 't2i_r10', 'num_images', ..}."""

    name = "retrieval"

    def __init__(self, config, workdir: str | None = None, tokenizer=None):
        self.config = ev.with_eval_defaults(config)
        if not self.config.eval.retrieval_split:
            raise ValueError(
                "RetrievalEvaluator needs config.eval.retrieval_split (a split of config.data with captions)"
            )
        self.workdir, self.tokenizer = workdir, tokenizer

    def fn(self, params, step: int) -> dict:
        encoder = ev.ParamsEncoder(self.config, params, self.workdir, tokenizer=self.tokenizer)
        return run_retrieval(self.config, encoder, log=lambda m: None)
