"""DALL-E attention masks: the paper's masks against references built another way, reachability
through the whole layer stack, the legacy masks, and the checks that keep old checkpoints on them."""

import ml_collections
import numpy as np
import pytest

from core_jax.config import ConfigError
from dalle_jax import masks
from tests.testfiles import load_config


# ----------------------------------------------------------------------------- the paper's masks


def reference_mask(kind, text_len, grid, k):
    """The paper's masks built column by column from the causal mask, clearing what each image key
    may not be read by (the construction ruDALL-E's image_attention.py uses for row and column),
    and the conv mask from 2D grid coordinates, not from stream offsets."""
    T = text_len + grid * grid
    out = np.tril(np.ones((T, T), bool))
    first_image = text_len + 1  # positions from here on hold image tokens; text keys stay visible
    for key in range(first_image, T):
        if kind == "row":  # read by the query at `key` and the grid after it
            out[key + grid + 1 :, key] = False
        elif kind == "column":  # read by every grid-th query from `key` on
            for start in range(key + 1, T, grid):
                out[start : start + grid - 1, key] = False
        elif kind == "conv":
            out[key + 1 :, key] = False
    if kind == "conv":
        half = k // 2
        for p in range(first_image, T):
            r, c = divmod(p - first_image, grid)  # the token the query holds
            for dr in range(-half, 1):  # rows above it and its own
                for dc in range(-half, half + 1):
                    held = (r + dr) * grid + (c + dc)  # raster order: wraps into the next row
                    if 0 <= held <= p - first_image:  # causal
                        out[p, first_image + held] = True
    return out


# Figure 11 of the paper: 6 text tokens, a 4 x 4 grid, a 3 x 3 conv kernel.
FIGURE_11 = dict(text_len=6, grid=4, k=3)


@pytest.mark.parametrize("kind", masks.KINDS)
@pytest.mark.parametrize(
    "text_len,grid,k", [tuple(FIGURE_11.values()), (3, 4, 3), (1, 5, 3), (2, 6, 5), (2, 3, 5), (4, 8, 5)]
)
def test_mask_matches_reference(kind, text_len, grid, k):
    np.testing.assert_array_equal(
        masks.stream_mask(kind, text_len, grid, k), reference_mask(kind, text_len, grid, k)
    )


def test_figure_11_golden():
    """The image-to-image block at Figure 11's size, row = token predicted, column = token read."""
    lt, g = FIGURE_11["text_len"], FIGURE_11["grid"]

    def picture(kind):
        m = masks.stream_mask(kind, lt, g, FIGURE_11["k"])[lt:, lt + 1 :]  # [predicted i, held j]
        return ["".join("x" if v else "." for v in row) for row in m]

    # Row: the previous grid + 1 = 5 tokens (paper: "the previous 5 image tokens in raster order").
    assert picture("row")[4:8] == ["xxxx...........", "xxxxx..........", ".xxxxx.........", "..xxxxx........"]
    assert picture("row")[15] == "..........xxxxx"
    # Column: the token before the predicted one and every grid-th before that.
    assert picture("column")[13] == "x...x...x...x.." and picture("column")[6] == ".x...x........."
    # Conv 3 x 3 around the token before the predicted one, in raster order (offsets 0, 1, 3, 4, 5).
    assert picture("conv")[15] == ".........xxx.xx" and picture("conv")[4] == "x.xx..........."


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("kind", masks.KINDS)
def test_text_causal_and_images_see_all_text(kind, legacy):
    lt, g = 5, 4
    m = masks.stream_mask(kind, lt, g, 3, legacy)
    np.testing.assert_array_equal(m[:lt, : lt + 1], np.tril(np.ones((lt, lt + 1), bool)))
    assert m[lt:, : lt + 1].all()  # every image prediction reads BOS + all text
    assert not np.triu(m, 1).any()  # nothing reads the future


def test_row_column_conv_examples():
    lt, g = 2, 4
    # The query predicting image token (2, 1) is position lt + 2*4 + 1 and holds (2, 0); the key
    # holding (r, c) is position lt + 1 + 4r + c.
    p = lt + 9
    key = lambda r, c: lt + 1 + g * r + c
    row, col, conv = (masks.stream_mask(kind, lt, g, 3)[p] for kind in ("row", "column", "conv"))
    assert row[key(2, 0)] and row[key(1, 3)] and row[key(1, 0)] and not row[key(0, 3)]
    assert col[key(2, 0)] and col[key(1, 0)] and col[key(0, 0)] and not col[key(1, 1)]
    assert conv[key(2, 0)] and conv[key(1, 0)] and conv[key(1, 1)] and conv[key(0, 3)]
    assert not conv[key(1, 2)] and not conv[key(0, 0)]


# ----------------------------------------------------------------------------- reachability


def unreachable_pairs(kinds, text_len, grid, k, legacy=False):
    """(query, earlier image token) pairs with no path through the stack: (count, of how many).

    A layer lets position p depend on q when its mask allows it or p == q (the residual stream;
    the MLP mixes nothing), so the stack's dependence is the boolean product of (mask | I) over the
    layers. Text positions precede every image key and so relay nothing between image tokens:
    the image block (positions text_len .. T-1) is enough."""
    n = grid * grid
    table, index = masks.mask_table(tuple(kinds), text_len, grid, k, legacy)
    step = [(t[text_len:, text_len:] | np.eye(n, dtype=bool)).astype(np.float32) for t in table]
    causal = np.tril(np.ones((n, n), bool))
    reach = np.eye(n, dtype=np.float32)
    for layer in index:
        reach = (step[layer] @ reach > 0).astype(np.float32)  # float matmul: BLAS, exact counts
        if (reach > 0).sum() == causal.sum():
            break  # every causal pair is reached; (mask | I) can only keep it so
    reach = reach > 0
    assert not (reach & ~causal).any()
    # Query predicting token i is block position i; token j enters at block position j + 1.
    wanted = np.tril(np.ones((n, n - 1), bool), -1)  # [i, j], j < i
    return int((wanted & ~reach[:, 1:]).sum()), int(wanted.sum())


def test_paper_pattern_reaches_every_earlier_token_at_paper_scale():
    kinds = masks.paper_pattern(64)
    assert unreachable_pairs(kinds, 256, 32, 11) == (0, 523_776)
    # The legacy masks (what this test fails on): the token predicted at (31, 0) cannot see row 0
    # from column 22 on, among 84,845 pairs without a path.
    assert unreachable_pairs(kinds, 256, 32, 11, legacy=True) == (84_845, 523_776)


def test_paper_pattern_reaches_every_earlier_token_at_the_shapes_grid():
    m = load_config("dalle_shapes", "paper_masks").model
    kinds = masks.layer_kinds(m.attention_pattern, m.num_layers)
    n = m.image_grid**2
    assert unreachable_pairs(kinds, m.text_len, m.image_grid, m.conv_kernel) == (0, n * (n - 1) // 2)
    assert unreachable_pairs(kinds, m.text_len, m.image_grid, m.conv_kernel, legacy=True)[0] > 0


def test_row_then_column_is_enough_and_row_alone_is_not():
    assert unreachable_pairs(("row", "column"), 3, 6, 3)[0] == 0
    assert unreachable_pairs(("row", "row", "row"), 3, 6, 3)[0] > 0  # 3 x (grid + 1) back only


# ----------------------------------------------------------------------------- legacy masks


def _stream_tokens(text_len, grid):
    """What each input position holds and what it predicts, as tuples in stream order."""
    text = [("text", t) for t in range(text_len)]
    image = [("image", r, c) for r in range(grid) for c in range(grid)]
    order = [("bos",)] + text + image  # every token of the stream, first to last
    holds = order[:-1]  # position p holds order[p]
    predicts = order[1:]  # and predicts order[p + 1]
    return order, holds, predicts


def legacy_brute_force_mask(kind, text_len, grid, k):
    """The legacy masks from token identities: coordinates of the predicted token."""
    order, holds, predicts = _stream_tokens(text_len, grid)
    rank = {tok: i for i, tok in enumerate(order)}
    T = len(holds)
    out = np.zeros((T, T), bool)
    for p in range(T):
        target = predicts[p]
        for q in range(T):
            source = holds[q]
            if rank[source] >= rank[target]:  # may only read tokens before the one predicted
                continue
            if kind == "full" or source[0] != "image":
                out[p, q] = True  # all earlier text (and BOS) is always visible
                continue
            (_, r, c), (_, r2, c2) = target, source
            out[p, q] = {
                "row": r == r2,
                "column": c == c2,
                "conv": abs(r - r2) <= k // 2 and abs(c - c2) <= k // 2,
            }[kind]
    return out


@pytest.mark.parametrize("kind", masks.KINDS)
@pytest.mark.parametrize("text_len,grid,k", [(3, 4, 3), (1, 5, 3), (6, 4, 5), (2, 6, 1)])
def test_legacy_mask_matches_brute_force(kind, text_len, grid, k):
    np.testing.assert_array_equal(
        masks.stream_mask(kind, text_len, grid, k, legacy=True),
        legacy_brute_force_mask(kind, text_len, grid, k),
    )
    differs = not np.array_equal(
        masks.stream_mask(kind, text_len, grid, k), legacy_brute_force_mask(kind, text_len, grid, k)
    )
    assert differs == (kind != "full")


def _model(pattern="paper", **extra):
    return ml_collections.ConfigDict(dict(attention_pattern=pattern, num_layers=6, **extra))


def test_recorded_legacy_masks():
    assert masks.recorded_legacy_masks(_model(legacy_masks=True)) is True
    assert masks.recorded_legacy_masks(_model(legacy_masks=False)) is False
    assert masks.recorded_legacy_masks(_model("full")) is False  # 'full' never changed
    with pytest.raises(
        ConfigError,
        match=r"^runs/old/config.json has no model.legacy_masks.*add "
        r'"legacy_masks": true to the "model" section of '
        r"runs/old/config.json",
    ):
        masks.recorded_legacy_masks(_model("row"), "runs/old")


@pytest.mark.parametrize(
    "recorded,run,ok",
    [
        (dict(), dict(legacy_masks=False), False),  # old workdir, current masks
        (dict(), dict(legacy_masks=True), True),  # old workdir, old masks
        (dict(legacy_masks=True), dict(legacy_masks=False), False),
        (dict(legacy_masks=False), dict(legacy_masks=False), True),
        (dict(legacy_masks=False), dict(legacy_masks=True), False),
        (dict(pattern="full"), dict(legacy_masks=False), True),  # a 'full' model is unaffected
        (dict(), dict(pattern="full", legacy_masks=False), True),
    ],
)
def test_check_trained_masks(recorded, run, ok):
    recorded_config = ml_collections.ConfigDict(
        {"model": _model(recorded.pop("pattern", "paper"), **recorded)}
    )
    run_config = ml_collections.ConfigDict({"model": _model(run.pop("pattern", "paper"), **run)})
    if ok:
        masks.check_trained_masks(run_config, recorded_config, "W")
    else:
        with pytest.raises(
            ConfigError,
            match=r"^the params in W were trained with the .* masks; rerun with "
            r"--config.model.legacy_masks=(True|False), or retrain",
        ):
            masks.check_trained_masks(run_config, recorded_config, "W")


# ----------------------------------------------------------------------------- layer patterns


def test_paper_pattern():
    kinds = masks.paper_pattern(10)
    assert kinds == ("row", "column", "row", "row", "row", "column", "row", "row", "row", "conv")
    assert masks.layer_kinds("paper", 10) == kinds
    assert masks.layer_kinds("full", 3) == ("full",) * 3
    assert masks.layer_kinds("row, column,conv", 3) == ("row", "column", "conv")


@pytest.mark.parametrize(
    "pattern,layers,match",
    [("diagonal", 2, "unknown mask kind"), ("row,column", 3, "lists 2 kinds"), ("", 2, "non-empty")],
)
def test_bad_patterns(pattern, layers, match):
    with pytest.raises(ValueError, match=match):
        masks.layer_kinds(pattern, layers)


def test_bad_conv_kernel():
    with pytest.raises(ValueError, match="odd"):
        masks.stream_mask("conv", 2, 4, 4)


@pytest.mark.parametrize("legacy", [False, True])
def test_mask_table_keeps_distinct_kinds(legacy):
    kinds = ("row", "column", "row", "conv")
    table, index = masks.mask_table(kinds, 3, 4, 3, legacy)
    assert table.shape == (3, 3 + 16, 3 + 16)
    for layer, kind in enumerate(kinds):
        np.testing.assert_array_equal(table[index[layer]], masks.stream_mask(kind, 3, 4, 3, legacy))
