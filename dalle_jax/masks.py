"""Attention masks of the DALL-E transformer, over the one text+image stream.

Stream layout (T = text_len + n_image positions, the model input is shifted by one):

    position p:      0     1 .. text_len          text_len+1 .. T-1
    holds (input):   BOS   text[0 .. text_len-1]   image[0 .. n_image-2]
    predicts:        text[p]                       for p <  text_len
                     image[p - text_len]           for p >= text_len

So position `text_len` holds the last text token and predicts the first image token, and the last
image token is predicted but never fed. Image tokens are the dVAE grid in row-major order:
image[i] sits at row i // grid, column i % grid.

A mask answers "may the query at position p read the key at position q". Every kind is causal
(q <= p), text is plain causal, and every query that predicts an image token sees all text
(positions 0 .. text_len). The kinds differ in which image keys such a query sees. Writing i for the
image token the query predicts, at (r, c), and j for the image token the key holds, at (r', c'),
the key is visible iff j < i (causality) and:

    full:    always                                  (plain causal attention)
    row:     r' == r                                 (earlier tokens of the same row)
    column:  c' == c                                 (earlier tokens of the same column)
    conv:    |r' - r| <= k // 2 and |c' - c| <= k // 2   (the k x k window around (r, c), k odd)

Coordinates are those of the token being predicted, not of the token the query position holds,
so "row attention" really means "to predict a token, look at what came before it in its row". One
consequence: a query predicting the first token of a row (c = 0) sees no image key in a row layer,
and a column layer never lets a position read its own key (it holds the token to the left of the
one it predicts); both still read all text and carry their own input through the residual stream.
"""
from __future__ import annotations

import functools

import numpy as np

KINDS = ("full", "row", "column", "conv")


def paper_pattern(num_layers: int) -> tuple[str, ...]:
    """DALL-E paper: column attention in layers with (i - 2) mod 4 == 0, row attention otherwise,
    convolutional attention in the last layer. Layers are numbered from 1 as in the paper, so with
    0-based index l the column layers are l = 1, 5, 9, ..."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    kinds = ["column" if (l + 1 - 2) % 4 == 0 else "row" for l in range(num_layers)]
    kinds[-1] = "conv"
    return tuple(kinds)


def layer_kinds(pattern: str, num_layers: int) -> tuple[str, ...]:
    """`model.attention_pattern` -> one mask kind per layer.

    'full' | 'paper' | a single kind for every layer | a comma list with exactly num_layers kinds.
    """
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"model.attention_pattern must be a non-empty string, got {pattern!r}")
    pattern = pattern.strip()
    if pattern == "paper":
        return paper_pattern(num_layers)
    kinds = tuple(k.strip() for k in pattern.split(","))
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"model.attention_pattern={pattern!r}: unknown mask kind(s) {bad}; "
                         f"use 'paper' or kinds from {KINDS}")
    if len(kinds) == 1:
        return kinds * num_layers
    if len(kinds) != num_layers:
        raise ValueError(f"model.attention_pattern={pattern!r} lists {len(kinds)} kinds but the "
                         f"model has num_layers={num_layers}")
    return kinds


def stream_mask(kind: str, text_len: int, grid: int, conv_kernel: int = 11) -> np.ndarray:
    """bool [T, T]: mask[p, q] is True when the query at position p may read the key at q."""
    if kind not in KINDS:
        raise ValueError(f"unknown attention mask kind {kind!r}; choose from {KINDS}")
    if kind == "conv" and (conv_kernel < 1 or conv_kernel % 2 == 0):
        raise ValueError(f"model.conv_kernel must be a positive odd number, got {conv_kernel}")
    total = text_len + grid * grid
    p = np.arange(total)[:, None]
    q = np.arange(total)[None, :]
    causal = q <= p
    if kind == "full":
        return causal
    key_is_text = q <= text_len
    i = p - text_len          # image token the query predicts (valid when p >= text_len)
    j = q - text_len - 1      # image token the key holds (valid when q > text_len)
    if kind == "row":
        related = (i // grid) == (j // grid)
    elif kind == "column":
        related = (i % grid) == (j % grid)
    else:
        half = conv_kernel // 2
        related = ((np.abs(i // grid - j // grid) <= half)
                   & (np.abs(i % grid - j % grid) <= half))
    # For image keys causality (q <= p) is exactly j < i; i and j are only meaningful there.
    image_ok = (p >= text_len) & (q > text_len) & related
    return causal & (key_is_text | image_ok)


@functools.lru_cache(maxsize=16)
def mask_table(kinds: tuple[str, ...], text_len: int, grid: int,
               conv_kernel: int) -> tuple[np.ndarray, np.ndarray]:
    """(masks bool [K, T, T] for the K distinct kinds in `kinds`, index int32 [num_layers]).

    Layer l uses masks[index[l]]; only the kinds the model uses are built, so the table stays small
    (the paper model needs 3 of 1280 x 1280)."""
    distinct = tuple(dict.fromkeys(kinds))
    table = np.stack([stream_mask(k, text_len, grid, conv_kernel) for k in distinct])
    index = np.asarray([distinct.index(k) for k in kinds], np.int32)
    table.setflags(write=False)
    index.setflags(write=False)
    return table, index
