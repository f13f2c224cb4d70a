"""DALL-E attention masks against a brute-force definition written from token identities."""
import numpy as np
import pytest

from dalle_jax import masks


def _stream_tokens(text_len, grid):
    """What each input position holds and what it predicts, as tuples in stream order."""
    text = [("text", t) for t in range(text_len)]
    image = [("image", r, c) for r in range(grid) for c in range(grid)]
    order = [("bos",)] + text + image          # every token of the stream, first to last
    holds = order[:-1]                          # position p holds order[p]
    predicts = order[1:]                        # and predicts order[p + 1]
    return order, holds, predicts


def brute_force_mask(kind, text_len, grid, k):
    order, holds, predicts = _stream_tokens(text_len, grid)
    rank = {tok: i for i, tok in enumerate(order)}
    T = len(holds)
    out = np.zeros((T, T), bool)
    for p in range(T):
        target = predicts[p]
        for q in range(T):
            source = holds[q]
            if rank[source] >= rank[target]:    # may only read tokens before the one predicted
                continue
            if kind == "full" or source[0] != "image":
                out[p, q] = True                # all earlier text (and BOS) is always visible
                continue
            (_, r, c), (_, r2, c2) = target, source
            out[p, q] = {"row": r == r2, "column": c == c2,
                         "conv": abs(r - r2) <= k // 2 and abs(c - c2) <= k // 2}[kind]
    return out


@pytest.mark.parametrize("kind", masks.KINDS)
@pytest.mark.parametrize("text_len,grid,k", [(3, 4, 3), (1, 5, 3), (6, 4, 5), (2, 6, 1)])
def test_mask_matches_brute_force(kind, text_len, grid, k):
    np.testing.assert_array_equal(masks.stream_mask(kind, text_len, grid, k),
                                  brute_force_mask(kind, text_len, grid, k))


@pytest.mark.parametrize("kind", masks.KINDS)
def test_text_causal_and_images_see_all_text(kind):
    lt, g = 5, 4
    m = masks.stream_mask(kind, lt, g, 3)
    np.testing.assert_array_equal(m[:lt, :lt + 1], np.tril(np.ones((lt, lt + 1), bool)))
    assert m[lt:, :lt + 1].all()              # every image prediction reads BOS + all text
    assert not np.triu(m, 1).any()            # nothing reads the future


def test_row_column_conv_examples():
    lt, g = 2, 4
    # The query predicting image token (2, 1) is position lt + 2*4 + 1; key holding (r, c) is
    # position lt + 1 + 4r + c.
    p = lt + 9
    key = lambda r, c: lt + 1 + g * r + c
    row, col, conv = (masks.stream_mask(kind, lt, g, 3)[p] for kind in ("row", "column", "conv"))
    assert row[key(2, 0)] and not row[key(1, 3)] and not row[key(2, 1)]
    assert col[key(0, 1)] and col[key(1, 1)] and not col[key(2, 0)] and not col[key(0, 2)]
    assert conv[key(1, 0)] and conv[key(1, 2)] and conv[key(2, 0)]
    assert not conv[key(0, 1)] and not conv[key(1, 3)]


def test_paper_pattern():
    kinds = masks.paper_pattern(10)
    assert kinds == ("row", "column", "row", "row", "row", "column", "row", "row", "row", "conv")
    assert masks.layer_kinds("paper", 10) == kinds
    assert masks.layer_kinds("full", 3) == ("full",) * 3
    assert masks.layer_kinds("row, column,conv", 3) == ("row", "column", "conv")


@pytest.mark.parametrize("pattern,layers,match", [
    ("diagonal", 2, "unknown mask kind"), ("row,column", 3, "lists 2 kinds"), ("", 2, "non-empty")])
def test_bad_patterns(pattern, layers, match):
    with pytest.raises(ValueError, match=match):
        masks.layer_kinds(pattern, layers)


def test_bad_conv_kernel():
    with pytest.raises(ValueError, match="odd"):
        masks.stream_mask("conv", 2, 4, 4)


def test_mask_table_keeps_distinct_kinds():
    kinds = ("row", "column", "row", "conv")
    table, index = masks.mask_table(kinds, 3, 4, 3)
    assert table.shape == (3, 3 + 16, 3 + 16)
    for layer, kind in enumerate(kinds):
        np.testing.assert_array_equal(table[index[layer]], masks.stream_mask(kind, 3, 4, 3))
