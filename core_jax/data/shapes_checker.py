"""Checker for the shapes suite: finds the objects in an image and scores caption fidelity.

Works on generated ground truth and on a model's noisy, blurry images:
1. candidate foreground = pixels whose brightest channel is >= FG_THRESHOLD;
2. each of those pixels gets the palette colour whose *scaled* version fits it best (blurring
   against black darkens a colour, it does not move it towards another palette entry), or
   UNKNOWN if even the best fit is far off;
3. 8-connected components (numpy label propagation, no scipy); each is cut again at
   RELATIVE_THRESHOLD of its own peak brightness, which puts a blurred edge back where the true
   edge was, whatever the colour or the model's contrast; a part where two colours each hold a
   sizeable share is split by colour (touching objects);
4. parts smaller than MIN_AREA are noise; the rest become objects whose colour is the majority
   pixel colour and whose shape is the ideal circle / square / upward triangle drawn in the same
   bbox with the highest IoU ('unknown' below MIN_IOU, or for elongated or huge blobs).

Positions and relations use the generator's rules with tolerance, and each family of words
partitions the plane (the 'center' disc vs. the quadrants; the four relation cones) so that a
caption with the wrong position or relation word always scores 0.
"""

from __future__ import annotations

import itertools

import numpy as np
from PIL import Image

from core_jax.data import shapes

FG_THRESHOLD = 70
RELATIVE_THRESHOLD = 0.5
MIN_IOU = 0.7
MAX_RESIDUAL = 70.0
MIN_AREA = 30
SPLIT_SHARE = 0.2
CENTER_TOLERANCE = 9.5  # generator: 'center' <= 7 px, quadrants >= 11.3 px from the centre
QUADRANT_TOLERANCE = 1.0  # the centre must be this far inside its quadrant
RELATION_TOLERANCE = 8.0  # generator uses 12
MAX_EXTENT = 40  # objects are 11-34 px; a larger blob (e.g. a washed-out image) is no shape
UNKNOWN = len(shapes.COLOURS)

_NAMES = list(shapes.COLOURS)
_PALETTE = np.array(list(shapes.COLOURS.values()), np.float32)  # [6, 3]
_PALETTE_SQ = (_PALETTE**2).sum(-1)
_SIZE = shapes.IMAGE_SIZE
_HALF = _SIZE / 2


def _as_float255(image) -> np.ndarray:
    """float32 [64, 64, 3] in 0..255 from uint8 or [0, 1] floats of any size."""
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.clip(np.nan_to_num(a.astype(np.float32)), 0.0, 1.0) * 255.0
    if a.shape[:2] != (_SIZE, _SIZE):
        # Position rules are in 64-px units, so other sizes are brought to 64 first.
        pil = Image.fromarray(np.round(a).astype(np.uint8))
        a = np.asarray(pil.resize((_SIZE, _SIZE), Image.BILINEAR))
    return a.astype(np.float32)


def classify_pixels(image) -> np.ndarray:
    """int [64, 64]: -1 background, 0..5 palette colour (COLOURS order), 6 unknown colour."""
    return _classify(_as_float255(image))


def _classify(img: np.ndarray) -> np.ndarray:
    bright = img.max(-1) >= FG_THRESHOLD
    px = img[bright]  # [N, 3]; only foreground pixels need a colour
    alpha = np.clip(px @ _PALETTE.T / _PALETTE_SQ, 0.25, 1.15)  # [N, 6] best brightness scale
    residual = np.sqrt(((px[:, None, :] - alpha[..., None] * _PALETTE) ** 2).sum(-1))
    out = np.full(bright.shape, -1, np.int64)
    out[bright] = np.where(residual.min(-1) <= MAX_RESIDUAL, residual.argmin(-1), UNKNOWN)
    return out


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components: (labels int [H, W], -1 outside mask, 0..n-1 inside; n)."""
    full = np.asarray(mask, bool)
    out = np.full(full.shape, -1, np.int64)
    if not full.any():
        return out, 0
    rows, cols = np.nonzero(full)
    window = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    mask = full[window]  # propagation only needs the mask's bbox
    h, w = mask.shape
    big = h * w
    flat_mask = mask.ravel()
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    padded = np.full((h + 2, w + 2), big, lab.dtype)
    while True:
        # Each pixel takes the smallest label among its neighbours; labels are pixel indices of the
        # same component, so pointer jumping (lab = lab[lab]) then halves the remaining distance.
        padded[1:-1, 1:-1] = lab
        m = lab.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                np.minimum(m, padded[dy : dy + h, dx : dx + w], out=m)
        flat = np.where(mask, m, big).ravel()
        flat[flat_mask] = flat[flat[flat_mask]]
        new = flat.reshape(h, w)
        if np.array_equal(new, lab):
            break
        lab = new
    roots, inverse = np.unique(lab[mask], return_inverse=True)
    sub = out[window]
    sub[mask] = inverse
    return out, len(roots)


def _templates(h: int, w: int) -> dict[str, np.ndarray]:
    u = ((np.arange(w) + 0.5) / w)[None, :]
    v = ((np.arange(h) + 0.5) / h)[:, None]
    return {
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "square": np.ones((h, w), bool),
        "triangle": np.abs(u - 0.5) <= v / 2,
    }


def shape_scores(crop: np.ndarray) -> dict[str, float]:
    """IoU of a bool mask (cropped to its bbox) with each ideal shape drawn in that bbox."""
    h, w = crop.shape
    return {name: float((crop & t).sum() / max((crop | t).sum(), 1)) for name, t in _templates(h, w).items()}


def classify_shape(crop: np.ndarray) -> str:
    """Shape of a bool mask cropped to its bbox: 'circle', 'square', 'triangle' or 'unknown'."""
    h, w = crop.shape
    if max(h, w) > MAX_EXTENT or max(h, w) > 1.5 * min(h, w):
        return "unknown"
    scores = shape_scores(crop)
    best = max(scores, key=scores.get)
    return best if scores[best] >= MIN_IOU else "unknown"


def _describe(mask: np.ndarray, colour_index: int) -> dict:
    rows, cols = np.nonzero(mask)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    return {
        "colour": _NAMES[colour_index] if colour_index < UNKNOWN else None,
        "shape": classify_shape(mask[y0:y1, x0:x1]),
        "centre": (float(x0 + x1) / 2, float(y0 + y1) / 2),
        "bbox": (int(x0), int(y0), int(x1), int(y1)),
        "area": int(len(rows)),
    }


def _split_by_colour(mask: np.ndarray, cls: np.ndarray) -> list[dict]:
    area = int(mask.sum())
    counts = np.bincount(cls[mask], minlength=UNKNOWN + 1)
    strong = [c for c in range(UNKNOWN + 1) if counts[c] >= max(MIN_AREA, SPLIT_SHARE * area)]
    if len(strong) <= 1:
        return [_describe(mask, int(counts.argmax()))]
    objects = []
    for c in strong:  # touching objects of different colours
        sub, n_sub = connected_components(mask & (cls == c))
        for j in range(n_sub):
            part = sub == j
            if part.sum() >= MIN_AREA:
                objects.append(_describe(part, c))
    return objects


def detect_objects(image) -> list[dict]:
    """Objects in an image (uint8 or [0, 1] float [H, W, 3]), sorted by centre x then y.

    Each is {'colour': name or None, 'shape': name or 'unknown', 'centre': (x, y), 'bbox': (x0, y0,
    x1, y1), 'area': pixels}, in the generator's continuous pixel coordinates.
    """
    img = _as_float255(image)
    brightness = img.max(-1)
    cls = _classify(img)
    comp, n = connected_components(cls >= 0)
    objects = []
    for k in range(n):
        m = comp == k
        if m.sum() < MIN_AREA:
            continue
        # Half the object's own peak brightness is where a blurred edge crosses the true edge, and it
        # drops noise specks and halos that joined the component at the low discovery threshold.
        peak = np.percentile(brightness[m], 90)
        core, n_core = connected_components(m & (brightness >= max(FG_THRESHOLD, RELATIVE_THRESHOLD * peak)))
        for j in range(n_core):
            part = core == j
            if part.sum() >= MIN_AREA:
                objects.extend(_split_by_colour(part, cls))
    objects.sort(key=lambda o: (o["centre"][0], o["centre"][1]))
    return objects


def position_holds(centre, position: str) -> bool:
    dx, dy = centre[0] - _HALF, centre[1] - _HALF
    near = np.hypot(dx, dy) <= CENTER_TOLERANCE
    if position == "center":
        return bool(near)
    if position not in shapes.POSITIONS:
        raise ValueError(f"unknown position {position!r}")
    sx = -1 if "left" in position else 1
    sy = -1 if "top" in position else 1
    return bool(not near and dx * sx >= QUADRANT_TOLERANCE and dy * sy >= QUADRANT_TOLERANCE)


def relation_holds(centre_a, centre_b, relation: str) -> bool:
    """Whether object a stands in `relation` to object b: the offset along the relation's axis is
    >= RELATION_TOLERANCE and larger than the offset along the other axis."""
    dx, dy = centre_b[0] - centre_a[0], centre_b[1] - centre_a[1]
    try:
        primary, other = {
            "to the left of": (dx, dy),
            "to the right of": (-dx, dy),
            "above": (dy, dx),
            "below": (-dy, dx),
        }[relation]
    except KeyError:
        raise ValueError(f"unknown relation {relation!r}") from None
    return bool(primary >= RELATION_TOLERANCE and primary > abs(other))


def matches(found: list[dict], labels) -> bool:
    """Whether detected objects match labels (an example dict or parse_caption output)."""
    if isinstance(labels, str):
        labels = shapes.parse_caption(labels)
    wanted = [(o["colour"], o["shape"]) for o in labels["objects"]]
    position, relation = labels.get("position"), labels.get("relation")
    if len(found) != len(wanted):
        return False
    for order in itertools.permutations(found):
        if any((o["colour"], o["shape"]) != w for o, w in zip(order, wanted)):
            continue
        if position is not None and not position_holds(order[0]["centre"], position):
            continue
        if relation is not None and not relation_holds(order[0]["centre"], order[1]["centre"], relation):
            continue
        return True
    return False


def fidelity(image, labels) -> float:
    """1.0 if the image shows exactly the labelled scene (objects, colours, shapes, position or
    relation), else 0.0; the mean over a set is the fraction of images that match their captions."""
    return float(matches(detect_objects(image), labels))


def caption_fidelity(image, caption: str) -> float:
    return fidelity(image, shapes.parse_caption(caption))
