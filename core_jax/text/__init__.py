"""Text tokenizers: CLIP-format byte-level BPE (OpenAI's merges or ones trained here)."""

from core_jax.text.bpe import (
    BPETokenizer,
    bytes_to_unicode,
    clean_text,
    find_open_clip_merges,
    load_captions,
    tokenizer_from_config,
    train_bpe,
    training_tokenizer,
)

__all__ = [
    "BPETokenizer",
    "bytes_to_unicode",
    "clean_text",
    "find_open_clip_merges",
    "load_captions",
    "tokenizer_from_config",
    "train_bpe",
    "training_tokenizer",
]
