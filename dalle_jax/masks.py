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
(positions 0 .. text_len). The kinds differ in which image keys such a query sees, and each is a
function of the offset d = p - q >= 0 alone, counted from the query's own position (it holds image
token h = p - text_len - 1 and predicts h + 1) exactly like the Sparse Transformer's strided
pattern with stride l = grid (Child et al. 2019, sec. 4.3: A(1)_i = {t, ..., i} for
t = max(0, i - l), the query's own position and the l before it; A(2)_i = {j : (i - j) mod l = 0}):

    full:    always                        plain causal attention
    row:     d <= grid                     the grid + 1 positions ending at the query's own: a
                                           sliding window over the raster order that crosses row
                                           boundaries; its oldest key holds the token one row
                                           above the held one
    column:  d % grid == 0                 the query's own key and every grid-th one before it:
                                           the earlier tokens of the held token's grid column
    conv:    |d - a * grid| <= k // 2      for some a in 0 .. k // 2: the causal half of the k x k
                                           window centred on the held token, each of its rows a
                                           raster segment that wraps into the neighbouring grid
                                           row at the image's edges, as the row window does

Where these come from. The DALL-E paper (Ramesh et al. 2021, appendix B.1, Figure 11, drawn for 6
text tokens and a 4 x 4 grid) uses column attention in layers with (i - 2) mod 4 == 0, row
attention otherwise and convolutional attention in the last layer. Its row mask lets each image
token attend to "the previous 5 image tokens in raster order", 5 = grid + 1 "so that the last token
being attended to is the one in the same column of the previous row"; its column mask is the
tokens of the same column (run as block attention on transposed image states); its conv mask is
"a causal convolutional attention pattern with wraparound behavior (similar to the row attention)"
drawn with a 3 x 3 kernel, and "our model uses a mask corresponding to an 11 x 11 kernel": 11 is the
paper's number (configs/dalle_paper.py), the shapes config's 5 is our choice for its 8 x 8 grid.
ruDALL-E (`rudalle/dalle/image_attention.py`: get_row_mask, get_col_mask) builds the same row and
column masks over the same kind of stream (a position holds the token before the one it predicts,
and the window of grid + 1 includes the query's own position); its get_conv_mask (kernel=11)
differs from ours only at the grid's edges: it wraps each coordinate modulo the grid (a torus, so
the last rows also read the first ones) where we wrap in raster order like the row window.
Relative to the predicted token i = h + 1, a row layer reads the grid + 1 tokens i - grid - 1 ..
i - 1 and a column layer i - 1, i - 1 - grid, ...; so a row layer followed by a column layer
already connects every earlier image token to every query, and the paper pattern has one at
layers 1-2 (tests/test_dalle_masks.py checks the whole stack).

`legacy=True` (model.legacy_masks) gives the masks of older versions of this code, which counted
from the predicted token i at (r, c) and the key's token j at (r', c') instead: row = j < i in grid
row r' == r, column = j < i in grid column c' == c, conv = j < i with |r' - r| and |c' - c| <= k // 2
(no wraparound). Through the paper pattern those leave 84,845 of the 523,776 (query, earlier image
token) pairs at grid 32 with no path at all (the token predicted at (31, 0) never sees row 0 from
column 22 on); they exist only to run models trained with them.
"""

from __future__ import annotations

import functools

import numpy as np

from core_jax.errors import ConfigError

KINDS = ("full", "row", "column", "conv")
SPARSE_KINDS = ("row", "column", "conv")  # the kinds whose meaning legacy_masks changes


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
        raise ValueError(
            f"model.attention_pattern={pattern!r}: unknown mask kind(s) {bad}; "
            f"use 'paper' or kinds from {KINDS}"
        )
    if len(kinds) == 1:
        return kinds * num_layers
    if len(kinds) != num_layers:
        raise ValueError(
            f"model.attention_pattern={pattern!r} lists {len(kinds)} kinds but the "
            f"model has num_layers={num_layers}"
        )
    return kinds


def _image_related(kind: str, d, grid: int, conv_kernel: int) -> np.ndarray:
    """Which image keys a query reads, from the offset d = p - q >= 0 between their positions
    (the paper's masks, see above: each depends on d alone, like the Sparse Transformer's)."""
    if kind == "row":
        return d <= grid
    if kind == "column":
        return d % grid == 0
    half = conv_kernel // 2
    # Grid row a above the held token's: the 2 * half + 1 raster positions centred a * grid back.
    return np.any([np.abs(d - a * grid) <= half for a in range(half + 1)], axis=0)


def _legacy_related(kind: str, p, q, text_len: int, grid: int, conv_kernel: int) -> np.ndarray:
    """The legacy masks: coordinates of the predicted token i and of the key's token j."""
    i, j = p - text_len, q - text_len - 1
    if kind == "row":
        return (i // grid) == (j // grid)
    if kind == "column":
        return (i % grid) == (j % grid)
    half = conv_kernel // 2
    return (np.abs(i // grid - j // grid) <= half) & (np.abs(i % grid - j % grid) <= half)


def stream_mask(
    kind: str, text_len: int, grid: int, conv_kernel: int = 11, legacy: bool = False
) -> np.ndarray:
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
    if legacy:
        related = _legacy_related(kind, p, q, text_len, grid, conv_kernel)
    else:
        related = _image_related(kind, p - q, grid, conv_kernel)
    # For image keys, causality (q <= p) also makes p an image position; `related` is only
    # meaningful there.
    return causal & (key_is_text | related)


@functools.lru_cache(maxsize=16)
def mask_table(
    kinds: tuple[str, ...], text_len: int, grid: int, conv_kernel: int, legacy: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(masks bool [K, T, T] for the K distinct kinds in `kinds`, index int32 [num_layers]).

    Layer l uses masks[index[l]]; only the kinds the model uses are built, so the table stays small
    (the paper model needs 3 of 1280 x 1280)."""
    distinct = tuple(dict.fromkeys(kinds))
    table = np.stack([stream_mask(k, text_len, grid, conv_kernel, legacy) for k in distinct])
    index = np.asarray([distinct.index(k) for k in kinds], np.int32)
    table.setflags(write=False)
    index.setflags(write=False)
    return table, index


# ----------------------------------------------------------------------------- trained workdirs
# A workdir's config.json holds model.legacy_masks when this version or a later one wrote it; one
# without the key was trained with the legacy masks. Running such params under the
# current masks would give wrong samples and losses without any error, so every path that loads a
# DALL-E workdir's params goes through one of the two checks below.


def _uses_sparse_masks(model) -> bool:
    kinds = layer_kinds(str(model.attention_pattern), int(model.num_layers))
    return any(k in SPARSE_KINDS for k in kinds)


def recorded_legacy_masks(model, workdir: str | None = None) -> bool:
    """model.legacy_masks of a config (`model`: its model section), for building the model from it.

    A config without the key was recorded before the masks were fixed: harmless for a 'full' model
    (False), a ConfigError naming `workdir` and the fix when it uses row/column/conv masks."""
    legacy = model.get("legacy_masks", None)
    if legacy is not None:
        return bool(legacy)
    if not _uses_sparse_masks(model):
        return False
    where = f"{workdir}/config.json" if workdir else "the config"
    raise ConfigError(
        f"{where} has no model.legacy_masks: it was written before the row/column/conv "
        f"attention masks were fixed and its model trained with the old ones; add "
        f'"legacy_masks": true to the "model" section of {where} to run it with '
        f"them, or retrain it"
    )


def check_trained_masks(run_config, recorded, source: str) -> None:
    """ConfigError unless a training run (`run_config`) would continue the params recorded by
    `recorded` (the config.json of the workdir it resumes, or of its init_from) with the masks they
    were trained with. `source` names that workdir in the error."""
    model = recorded.get("model", None)
    if model is None or "attention_pattern" not in model:
        return  # not a DALL-E workdir: the trainer's own checks report it
    if not (_uses_sparse_masks(model) and _uses_sparse_masks(run_config.model)):
        return  # a 'full' model on either side: the masks it meets do not depend on the flag
    trained = model.get("legacy_masks", None)
    trained = True if trained is None else bool(trained)  # no key: recorded before the fix
    if trained != bool(run_config.model.get("legacy_masks", False)):
        which = "old (legacy)" if trained else "current"
        raise ConfigError(
            f"the params in {source} were trained with the {which} row/column/conv "
            f"attention masks; rerun with --config.model.legacy_masks={trained}, or "
            f"retrain from scratch in a new --workdir"
        )
