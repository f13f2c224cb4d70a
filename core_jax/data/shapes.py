"""The built-in "shapes suite": deterministic captioned 64x64 RGB images, no files needed.

Scenes hold one object ("a red circle in the top left") or two non-overlapping objects
("a blue square to the left of a green triangle") on a black background. Four colour-shape pairs
(HELD_OUT_PAIRS) never occur in `train` or `test_seen`; every `test_unseen` scene holds at least one,
which measures compositional generalisation. (`train_pairs='all'` is a control that does draw them
into `train`, to measure what holding them out costs; it never draws a default `test_unseen` scene.)

`test_ood` measures generalisation to object size and placement, not composition: the colours,
shapes, colour-shape pairs (SEEN_PAIRS only), caption grammar, scene mix and geometry rules of
`test_seen`, but every object is smaller (OOD_SMALL_SIZES, 11-13 px) or larger (OOD_LARGE_SIZES,
27-34 px) than any `train` object (MIN_SIZE..MAX_SIZE, 14-26 px); each object picks either band
with probability 1/2 (two large objects rarely fit beside each other, so two-object scenes hold
mostly small ones). Positions follow the same rules inside the same BORDER, so small objects'
centres reach nearer the edges and corners (6.5 px) than any `train` centre (8 px). Since the sizes
differ, no `test_ood` scene is a `train` or `test_seen` scene. 11 px is the floor: the checker
reads 8-10 px triangles on clean images, but not reliably after the 3x3 blur it otherwise tolerates.

Coordinates are continuous pixel coordinates: pixel (row r, column c) covers [c, c+1) x [r, r+1),
so the image centre is (32, 32). An object's `bbox` is (x0, y0, x1, y1) with x1 = x0 + size
(exclusive) and its `centre` is the bbox centre, also for triangles, so that generator and checker
(core_jax/data/shapes_checker.py) agree without knowing the shape.

Geometry rules (the checker applies looser versions of the same rules):
- quadrant positions: the centre is >= QUADRANT_OFFSET px from both centre lines;
- 'center': the centre is within CENTER_RADIUS (< 8) px of (32, 32);
- relations: the centres differ by >= RELATION_MARGIN px along the relation's axis, and that offset
  exceeds the other axis' offset by >= DOMINANCE px, so exactly one relation describes the scene;
- two objects' bboxes are >= MIN_GAP px apart along some axis, so they stay separate after a blur.

`test_seen` must not repeat a `train` image: every scene gets an order-independent hash of what
determines its pixels; `test_seen` only draws scenes with hash % SEEN_BUCKETS == 0 and `train` never
does, whatever the seeds.
"""

from __future__ import annotations

import functools
import itertools
import re
import zlib

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (40, 70, 230),
    "yellow": (235, 220, 40),
    "purple": (170, 50, 210),
    "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "circle"), ("blue", "square"), ("white", "triangle")}
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
SEEN_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)
UNSEEN_PAIRS = tuple(p for p in ALL_PAIRS if p in HELD_OUT_PAIRS)
CLASS_NAMES: list[str] = [f"{c} {s}" for c, s in ALL_PAIRS]
IMAGE_SIZE = 64
SPLITS = ("train", "test_seen", "test_unseen", "test_ood")
DEFAULT_SPLIT_SIZES = {"train": 100_000, "test_seen": 1000, "test_unseen": 1000, "test_ood": 1000}

MIN_SIZE, MAX_SIZE = 14, 26
OOD_SMALL_SIZES = (11, 13)  # inclusive, test_ood only
OOD_LARGE_SIZES = (27, 34)  # 34 px still leaves room for a small object in every relation
BORDER = 1
QUADRANT_OFFSET = 8
CENTER_RADIUS = 7.0  # promise is "within 8 px"; 1 px of slack keeps the checker's boundary clear
RELATION_MARGIN = 12
DOMINANCE = 4
MIN_GAP = 3
SEEN_BUCKETS = 64
_CANDIDATES = 128  # scene candidates drawn per vectorised round of rejection sampling

_HALF = IMAGE_SIZE / 2
_PAIR_INDEX = {p: i for i, p in enumerate(ALL_PAIRS)}
_SEEN_IDX = np.array([_PAIR_INDEX[p] for p in SEEN_PAIRS])
_UNSEEN_IDX = np.array([_PAIR_INDEX[p] for p in UNSEEN_PAIRS])
_PIX = np.arange(IMAGE_SIZE, dtype=np.float64) + 0.5


def class_label(colour: str, shape: str) -> int:
    """Class index of a colour-shape pair: colour_index * 3 + shape_index."""
    return list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)


# ----------------------------------------------------------------------------------------------
# Captions: the one place that turns labels into text and back.


def _pair(obj) -> tuple[str, str]:
    if isinstance(obj, dict):
        return obj["colour"], obj["shape"]
    colour, shape = obj
    return colour, shape


def caption_for(objects, position: str | None = None, relation: str | None = None) -> str:
    """Caption of a scene; `objects` are dicts with 'colour'/'shape' or (colour, shape) tuples."""
    pairs = [_pair(o) for o in objects]
    for colour, shape in pairs:
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"unknown object {colour!r} {shape!r}")
    if len(pairs) == 1 and position in POSITIONS and relation is None:
        return f"a {pairs[0][0]} {pairs[0][1]} in the {position}"
    if len(pairs) == 2 and relation in RELATIONS and position is None:
        (c0, s0), (c1, s1) = pairs
        return f"a {c0} {s0} {relation} a {c1} {s1}"
    raise ValueError(f"no caption for {len(pairs)} objects, position={position!r}, relation={relation!r}")


_WORD = r"([a-z]+)"
_POSITION_RE = re.compile(
    rf"^an? {_WORD} {_WORD} in the (top left|top right|bottom left|bottom right|center|centre)$"
)
_RELATION_RE = re.compile(
    rf"^an? {_WORD} {_WORD} (to the left of|to the right of|above|below) an? {_WORD} {_WORD}$"
)


def parse_caption(caption: str) -> dict:
    """Inverse of caption_for: {'objects': [{'colour', 'shape'}], 'position', 'relation'} (one is None)."""
    text = " ".join(str(caption).lower().replace(".", " ").split())
    m = _POSITION_RE.match(text)
    if m:
        words, position, relation = [m.groups()[:2]], m.group(3).replace("centre", "center"), None
    else:
        m = _RELATION_RE.match(text)
        if not m:
            raise ValueError(f"cannot parse shapes caption {caption!r}")
        g = m.groups()
        words, position, relation = [g[0:2], g[3:5]], None, g[2]
    objects = []
    for colour, shape in words:
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"unknown object {colour!r} {shape!r} in caption {caption!r}")
        objects.append({"colour": colour, "shape": shape})
    return {"objects": objects, "position": position, "relation": relation}


def _one_object_pairs(split: str):
    _check_split(split)
    return UNSEEN_PAIRS if split == "test_unseen" else SEEN_PAIRS


def _two_object_pairs(split: str):
    _check_split(split)
    ordered = [(a, b) for a, b in itertools.product(ALL_PAIRS, ALL_PAIRS) if a != b]
    if split == "test_unseen":
        return [(a, b) for a, b in ordered if a in HELD_OUT_PAIRS or b in HELD_OUT_PAIRS]
    return [(a, b) for a, b in ordered if a not in HELD_OUT_PAIRS and b not in HELD_OUT_PAIRS]


def all_captions(split: str) -> list[str]:
    """Every distinct caption `split` can produce, in a fixed order."""
    out = [caption_for([p], position=pos) for p in _one_object_pairs(split) for pos in POSITIONS]
    out += [caption_for([a, b], relation=r) for a, b in _two_object_pairs(split) for r in RELATIONS]
    return out


# ----------------------------------------------------------------------------------------------
# Rendering.


def shape_mask(shape: str, x0: float, y0: float, size: float) -> np.ndarray:
    """bool [64, 64]: pixels whose centre lies inside the shape with bbox (x0, y0, x0+size, y0+size)."""
    x, y = _PIX[None, :], _PIX[:, None]
    cx, cy = x0 + size / 2, y0 + size / 2
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= (size / 2) ** 2
    if shape == "square":
        return (x >= x0) & (x < x0 + size) & (y >= y0) & (y < y0 + size)
    if shape == "triangle":
        d = y - y0  # apex at the top: the half-width grows by 1/2 px per row
        return (d >= 0) & (d <= size) & (np.abs(x - cx) <= d / 2)
    raise ValueError(f"unknown shape {shape!r}")


def render(objects) -> np.ndarray:
    """uint8 [64, 64, 3] image of objects given as dicts with 'colour', 'shape', 'bbox' (and 'size')."""
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for o in objects:
        x0, y0 = o["bbox"][0], o["bbox"][1]
        size = o.get("size", o["bbox"][2] - x0)
        image[shape_mask(o["shape"], x0, y0, size)] = COLOURS[o["colour"]]
    return image


# ----------------------------------------------------------------------------------------------
# Sampling. Candidates are drawn in vectorised batches and the first valid one is taken, which is
# both deterministic in the RNG and cheap enough for data-loader workers.


def _check_split(split: str):
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; expected one of {SPLITS}")


def check_train_pairs(train_pairs: str, split: str = "train", name: str = "train_pairs") -> bool:
    """Whether `train_pairs` asks for all colour-shape pairs; ValueError naming `name` if invalid."""
    if train_pairs not in ("seen", "all"):
        raise ValueError(f"{name} must be 'seen' or 'all', got {train_pairs!r}")
    if train_pairs == "all" and split != "train":
        raise ValueError(f"{name}='all' applies to the train split only, not {split!r}")
    return train_pairs == "all"


def check_fraction(one_object_fraction: float, name: str = "one_object_fraction"):
    """ValueError naming `name` unless the share of one-object scenes is in [0, 1]."""
    if not 0.0 <= one_object_fraction <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {one_object_fraction}")


def _mix(x: np.ndarray) -> np.ndarray:
    # splitmix64 finaliser; uint64 array arithmetic wraps silently.
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    return x ^ (x >> 31)


def _object_hash(pair, size, x0, y0) -> np.ndarray:
    code = ((pair.astype(np.uint64) * 32 + size.astype(np.uint64)) * 64 + x0.astype(np.uint64)) * 64
    return _mix(code + y0.astype(np.uint64) + 1)


def _bucket_ok(split: str, scene_hash: np.ndarray) -> np.ndarray:
    # test_unseen (held-out pairs) and test_ood (sizes outside the train range) cannot meet a
    # train scene, so only test_seen needs a bucket of its own.
    in_seen_bucket = (_mix(scene_hash) % SEEN_BUCKETS) == 0
    if split == "train":
        return ~in_seen_bucket
    if split == "test_seen":
        return in_seen_bucket
    return np.ones(scene_hash.shape, bool)


def _scene_hash(objects) -> np.ndarray:
    """uint64 [1]: the order-independent hash of a finished scene's objects."""
    h = np.zeros((1,), np.uint64)
    for o in objects:
        h = h + _object_hash(
            np.array([_PAIR_INDEX[_pair(o)]]),
            np.array([o["size"]]),
            np.array([o["bbox"][0]]),
            np.array([o["bbox"][1]]),
        )
    return h


def _scene_bucket_ok(split: str, objects) -> bool:
    """Whether a finished scene may occur in `split` (exposed for tests)."""
    return bool(_bucket_ok(split, _scene_hash(objects))[0])


@functools.cache
def _unseen_test_hashes() -> np.ndarray:
    """Scene hashes of the default `test_unseen` split (seed 0), which train_pairs='all' never draws."""
    return np.concatenate(
        [
            _scene_hash(make_example("test_unseen", i)["objects"])
            for i in range(DEFAULT_SPLIT_SIZES["test_unseen"])
        ]
    )


def _scene_ok(split: str, scene_hash: np.ndarray, all_pairs: bool) -> np.ndarray:
    ok = _bucket_ok(split, scene_hash)
    if all_pairs:
        ok &= ~np.isin(scene_hash, _unseen_test_hashes())
    return ok


def _draw_sizes(rng: np.random.Generator, split: str, shape) -> np.ndarray:
    """Object sizes (bbox sides, px): the train range, or for test_ood one of the two bands outside it."""
    if split != "test_ood":
        return rng.integers(MIN_SIZE, MAX_SIZE + 1, size=shape)
    small = rng.integers(OOD_SMALL_SIZES[0], OOD_SMALL_SIZES[1] + 1, size=shape)
    large = rng.integers(OOD_LARGE_SIZES[0], OOD_LARGE_SIZES[1] + 1, size=shape)
    return np.where(rng.random(shape) < 0.5, small, large)


def _sample_one(rng: np.random.Generator, split: str, all_pairs: bool = False):
    position = POSITIONS[rng.integers(len(POSITIONS))]
    pairs_idx = _UNSEEN_IDX if split == "test_unseen" else _SEEN_IDX
    if all_pairs:
        pairs_idx = np.arange(len(ALL_PAIRS))
    n = _CANDIDATES
    while True:
        pair = pairs_idx[rng.integers(len(pairs_idx), size=n)]
        size = _draw_sizes(rng, split, n)
        low, high = np.full(n, BORDER), IMAGE_SIZE - BORDER - size  # inclusive range of x0 / y0
        if position == "center":
            lo = np.maximum(low, np.ceil(_HALF - CENTER_RADIUS - size / 2)).astype(int)
            hi = np.minimum(high, np.floor(_HALF + CENTER_RADIUS - size / 2)).astype(int)
            x0, y0 = rng.integers(lo, hi + 1), rng.integers(lo, hi + 1)
            valid = np.hypot(x0 + size / 2 - _HALF, y0 + size / 2 - _HALF) <= CENTER_RADIUS
        else:
            before_hi = np.floor(_HALF - QUADRANT_OFFSET - size / 2).astype(int)  # centre <= 24
            after_lo = np.ceil(_HALF + QUADRANT_OFFSET - size / 2).astype(int)  # centre >= 40
            xs = (low, before_hi) if "left" in position else (after_lo, high)
            ys = (low, before_hi) if "top" in position else (after_lo, high)
            x0, y0 = rng.integers(xs[0], xs[1] + 1), rng.integers(ys[0], ys[1] + 1)
            valid = np.ones(n, bool)
        valid &= _scene_ok(split, _object_hash(pair, size, x0, y0), all_pairs)
        if valid.any():
            i = int(np.argmax(valid))
            return [(int(pair[i]), int(size[i]), int(x0[i]), int(y0[i]))], position


def _sample_two(rng: np.random.Generator, split: str, all_pairs: bool = False):
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    n = _CANDIDATES
    while True:
        if split == "test_unseen":
            held = _UNSEEN_IDX[rng.integers(len(_UNSEEN_IDX), size=n)]
            other = rng.integers(len(ALL_PAIRS), size=n)
            first = rng.integers(2, size=n) == 0
            pa, pb = np.where(first, held, other), np.where(first, other, held)
        elif all_pairs:
            pa, pb = rng.integers(len(ALL_PAIRS), size=(2, n))
        else:
            pa = _SEEN_IDX[rng.integers(len(_SEEN_IDX), size=n)]
            pb = _SEEN_IDX[rng.integers(len(_SEEN_IDX), size=n)]
        sa, sb = _draw_sizes(rng, split, (2, n))
        xa, ya = rng.integers(BORDER, IMAGE_SIZE - BORDER - sa + 1, size=(2, n))
        xb, yb = rng.integers(BORDER, IMAGE_SIZE - BORDER - sb + 1, size=(2, n))
        dx = (xb + sb / 2) - (xa + sa / 2)  # > 0: a is left of b
        dy = (yb + sb / 2) - (ya + sa / 2)  # > 0: a is above b
        primary, other_axis = {
            "to the left of": (dx, dy),
            "to the right of": (-dx, dy),
            "above": (dy, dx),
            "below": (-dy, dx),
        }[relation]
        gap = np.maximum(
            np.maximum(xb - (xa + sa), xa - (xb + sb)), np.maximum(yb - (ya + sa), ya - (yb + sb))
        )
        valid = (
            (pa != pb)
            & (primary >= RELATION_MARGIN)
            & (primary >= np.abs(other_axis) + DOMINANCE)
            & (gap >= MIN_GAP)
        )
        # Addition keeps the hash independent of caption order: "A left of B" and "B right of A" are one image.
        valid &= _scene_ok(split, _object_hash(pa, sa, xa, ya) + _object_hash(pb, sb, xb, yb), all_pairs)
        if valid.any():
            i = int(np.argmax(valid))
            return [
                (int(pa[i]), int(sa[i]), int(xa[i]), int(ya[i])),
                (int(pb[i]), int(sb[i]), int(xb[i]), int(yb[i])),
            ], relation


def _object_dict(pair_index: int, size: int, x0: int, y0: int) -> dict:
    colour, shape = ALL_PAIRS[pair_index]
    return {
        "colour": colour,
        "shape": shape,
        "centre": (x0 + size / 2, y0 + size / 2),
        "bbox": (x0, y0, x0 + size, y0 + size),
        "size": size,
    }


def make_example(
    split: str, index: int, seed: int = 0, one_object_fraction: float = 0.5, train_pairs: str = "seen"
) -> dict:
    """The raw example `index` of `split`; a pure function of its arguments.

    train_pairs='all' (train split only) is a control, not training data: its scenes also hold the
    HELD_OUT_PAIRS (never a scene of the default `test_unseen` split), so that a model trained on it
    and on the default train split measure what holding the pairs out costs.
    """
    _check_split(split)
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got {index}, {seed}")
    check_fraction(one_object_fraction)
    all_pairs = check_train_pairs(train_pairs, split)
    # The split name is part of the seed, so each split is its own stream.
    rng = np.random.default_rng([int(seed), zlib.crc32(split.encode()), int(index)])
    if rng.random() < one_object_fraction:
        params, position = _sample_one(rng, split, all_pairs)
        relation = None
    else:
        params, relation = _sample_two(rng, split, all_pairs)
        position = None
    objects = [_object_dict(*p) for p in params]
    caption = caption_for(objects, position=position, relation=relation)
    label = class_label(objects[0]["colour"], objects[0]["shape"]) if len(objects) == 1 else -1
    return {
        "image": render(objects),
        "caption": caption,
        "captions": [caption],
        "label": label,
        "key": f"{split}/{index}",
        "objects": objects,
        "position": position,
        "relation": relation,
    }


class ShapesSource:
    """Random-access source over a split (grain.MapDataset.source-compatible)."""

    def __init__(
        self,
        split: str = "train",
        size: int | None = None,
        seed: int = 0,
        one_object_fraction: float = 0.5,
        one_object_only: bool = False,
        train_pairs: str = "seen",
    ):
        _check_split(split)
        check_fraction(one_object_fraction)
        check_train_pairs(train_pairs, split)
        self.train_pairs = train_pairs
        self.split = split
        self.size = DEFAULT_SPLIT_SIZES[split] if size is None else int(size)
        self.seed = seed
        self.one_object_fraction = 1.0 if one_object_only else one_object_fraction

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} examples")
        return make_example(self.split, index, self.seed, self.one_object_fraction, self.train_pairs)

    def __repr__(self):
        return (
            f"ShapesSource(split={self.split!r}, size={self.size}, seed={self.seed}, "
            f"one_object_fraction={self.one_object_fraction}, train_pairs={self.train_pairs!r})"
        )
