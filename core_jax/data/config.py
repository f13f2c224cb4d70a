"""Every `config.data` key with its default (documented in docs/data.md)."""

from __future__ import annotations

import ml_collections

from core_jax.data import decode


# `num_workers` of the paper-scale configs: at 4-6 CPU-ms per 256 px JPEG (docs/data.md) the calling
# thread alone feeds ~200 images/s, far below a pod host's share of their batches. Not measured on
# a pod; size it to the host's free cores.
POD_HOST_WORKERS = 32


def default_data_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            source="shapes",  # shapes | tfds | webdataset | folder | tokens | embeddings
            name="",  # TFDS builder name (tfds)
            split="train",
            eval_split="test_seen",
            data_dir="",  # TFDS data_dir (local or bucket); folder: dir holding index.*;
            # tokens: encode_dataset's --out_dir
            embeddings_dir="",  # embeddings: dalle_jax.unclip.encode_embeddings's --out_dir
            urls="",  # webdataset shards: brace pattern / glob / comma list
            eval_urls="",  # shards for eval_split (else `urls`)
            index_file="",  # folder: CSV/TSV/JSONL/Parquet of path,caption
            eval_index_file="",  # index for eval_split (else `index_file`)
            image_key="image",
            caption_key="caption",  # '' = captions not required; tfds coco: 'captions/text'
            label_key="label",
            image_size=64,
            random_crop=False,
            random_flip=False,
            # (lo, hi) with random_crop: the shorter side is resized to a random size in
            # [lo, hi] * image_size before the random crop (image_ops.random_resized_crop; the DALL-E
            # dVAE's (1.125, 1.5)); (1, 1) = plain resize to image_size.
            random_resize_range=(1.0, 1.0),
            num_workers=0,  # decode/augment threads; 0 = in the calling thread
            prefetch=2,  # batches decoded ahead of the step (with num_workers > 0)
            shapes_train_size=100000,
            shapes_one_object_fraction=0.5,  # train split only: share of one-object scenes
            shapes_train_pairs="seen",  # 'all': train also on the held-out pairs (a control, docs/data.md)
            shuffle_buffer=1000,  # webdataset: samples permuted together in training
            min_image_side=decode.DEFAULT_MIN_SIDE,
            max_image_pixels=decode.DEFAULT_MAX_PIXELS,  # 0 = no limit
        )
    )


def with_defaults(data_config) -> ml_collections.ConfigDict:
    """Fills keys a (possibly older or hand-written) config lacks, keeping any extra keys."""
    merged = default_data_config().to_dict()
    given = data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config or {})
    merged.update(given)
    return ml_collections.ConfigDict(merged)
