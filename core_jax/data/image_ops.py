"""Host-side image helpers: colour conversion to RGB uint8, resize/crop, flips, value mappings.

Transparency is composited onto black (premultiplied alpha). Fully transparent pixels are usually
stored as (0, 0, 0, 0), so this matches what a plain `convert('RGB')` (OpenAI CLIP's preprocessing)
gives for most real images, while removing the arbitrary colours some encoders leave under alpha=0.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)
DVAE_EPS = 0.1
_CLIP_SCALE = (1.0 / (255.0 * CLIP_STD)).astype(np.float32)
_CLIP_SHIFT = (CLIP_MEAN / CLIP_STD).astype(np.float32)

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}


def exif_transpose(img: Image.Image) -> Image.Image:
    """Phone photos store rotation in EXIF; without this they train sideways."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block should not cost us the image
        return img
    return ImageOps.exif_transpose(img) if orientation not in (0, 1) else img


def _composite_on_black(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.uint32)[..., None]
    return ((rgb.astype(np.uint32) * a + 127) // 255).astype(np.uint8)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Any integer/float/bool array -> uint8, scaling 16-bit data down instead of clipping it."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        # Floats in [0, 1] (float features) are scaled; anything larger is taken as 0..255.
        arr = np.nan_to_num(arr.astype(np.float32))
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        return (np.clip(arr * scale, 0.0, 255.0) + 0.5).astype(np.uint8)
    if arr.dtype in (np.uint16, np.int16) or arr.max(initial=0) > 255:
        return (np.clip(arr.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def array_to_rgb(arr: np.ndarray) -> np.ndarray:
    """[H, W], [H, W, 1|2|3|4] of any numeric dtype -> uint8 [H, W, 3]. 2 channels = gray+alpha."""
    arr = _to_uint8(np.asarray(arr))
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"cannot convert an array of shape {arr.shape} to RGB")
    c = arr.shape[-1]
    if c == 1:
        return np.ascontiguousarray(np.repeat(arr, 3, axis=-1))
    if c == 2:
        return np.repeat(_composite_on_black(arr[..., :1], arr[..., 1]), 3, axis=-1)
    if c == 4:
        return _composite_on_black(arr[..., :3], arr[..., 3])
    return arr if arr.flags.writeable and arr.flags.c_contiguous else np.array(arr)


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """A PIL image in any mode -> uint8 [H, W, 3]."""
    mode = img.mode
    if mode == "RGB":
        return np.array(img, np.uint8)  # np.asarray would give a read-only view
    if mode == "P":  # palette: transparency lives in img.info, not in a band
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        if mode in ("La", "RGBa"):  # already premultiplied
            img = img.convert("RGB" if mode == "RGBa" else "L")
            return array_to_rgb(np.asarray(img))
        if mode == "PA":
            img = img.convert("RGBA")
        return array_to_rgb(np.asarray(img))
    if mode.startswith("I"):
        # 16-bit PNG/TIFF open as 'I;16*' or 'I' (int32 holding 0..65535): keep the top 8 bits.
        arr = np.asarray(img)
        return array_to_rgb(np.clip(arr, 0, 65535).astype(np.uint16))
    if mode == "F":
        return array_to_rgb(np.asarray(img))
    if mode in ("L", "1"):
        return array_to_rgb(np.asarray(img.convert("L")))
    return np.array(img.convert("RGB"), np.uint8)  # CMYK, YCbCr, LAB, HSV


def resize_and_crop(
    img: np.ndarray,
    size: int,
    random_crop: bool = False,
    rng: np.random.Generator | None = None,
    resample: str = "bicubic",
    resize_range: tuple[float, float] = (1.0, 1.0),
) -> np.ndarray:
    """Resize the shorter side to `size`, then take a `size` x `size` centre (or random) crop.

    An image whose shorter side already equals `size` is only cropped, never resampled. With
    `random_crop` and a `resize_range` other than (1, 1): `random_resized_crop`.
    """
    if random_crop and tuple(float(r) for r in resize_range) != (1.0, 1.0):
        return random_resized_crop(img, size, resize_range, rng, resample)
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    if min(h, w) != size:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        img = np.asarray(Image.fromarray(img).resize((nw, nh), _RESAMPLE[resample]))
        h, w = nh, nw
    if random_crop:
        rng = rng if rng is not None else np.random.default_rng()
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    else:
        top, left = (h - size) // 2, (w - size) // 2
    return img[top : top + size, left : left + size]


def random_resized_crop(
    img: np.ndarray,
    size: int,
    resize_range: tuple[float, float],
    rng: np.random.Generator | None = None,
    resample: str = "bicubic",
) -> np.ndarray:
    """The dVAE augmentation of the DALL-E paper (Ramesh et al. 2021, appendix A.2, Listing 1;
    there resize_range = (9/8, 12/8)): a random square crop of the whole shorter side s, resized
    to t x t with t a uniform integer in [min(s, lo * size), min(s, hi * size)], then a random
    `size` x `size` crop. The crop so keeps between 1/hi and 1/lo of the square's side, at a
    random place. Downscaling averages areas (PIL's box filter, the paper's ResizeMethod.AREA);
    an image smaller than `size` is upscaled to it with `resample`, as resize_and_crop does.
    """
    rng = rng if rng is not None else np.random.default_rng()
    lo, hi = (float(r) for r in resize_range)
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    img = img[top : top + s, left : left + s]
    t = int(rng.integers(min(s, round(lo * size)), min(s, round(hi * size)) + 1))
    t = max(t, size)
    if t != s:
        filt = Image.Resampling.BOX if t < s else _RESAMPLE[resample]
        img = np.asarray(Image.fromarray(img).resize((t, t), filt))
    top, left = int(rng.integers(0, t - size + 1)), int(rng.integers(0, t - size + 1))
    return img[top : top + size, left : left + size]


def maybe_flip(img: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Horizontal flip with probability p (callers gate it on config.data.random_flip)."""
    return img[:, ::-1] if rng.random() < p else img


def to_float01(img: np.ndarray) -> np.ndarray:
    return np.asarray(img, np.float32) * np.float32(1.0 / 255.0)


def clip_normalize(img: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 normalised with OpenAI CLIP's mean/std."""
    return np.asarray(img, np.float32) * _CLIP_SCALE - _CLIP_SHIFT  # one pass fewer than (x-m)/s


def map_pixels(x, eps: float = DVAE_EPS):
    """DALL-E dVAE input mapping [0, 1] -> [eps, 1 - eps] (works on numpy and jax arrays)."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x, eps: float = DVAE_EPS):
    """Inverse of map_pixels, clipped to [0, 1] (works on numpy and jax arrays)."""
    y = (x - eps) / (1 - 2 * eps)
    return y.clip(0, 1) if hasattr(y, "clip") else min(max(y, 0.0), 1.0)


def dvae_map_pixels(img: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 in [eps, 1 - eps]."""
    return map_pixels(to_float01(img)).astype(np.float32)
