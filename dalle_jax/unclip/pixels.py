"""Pixels as the unCLIP decoder and upsamplers see them, on the host: [-1, 1] floats, area
resizing, and the Gaussian blur that corrupts an upsampler's low-resolution input.

    to_model(uint8) -> float32 in [-1, 1]        to_uint8(x in [-1, 1]) -> uint8
    area_resize(images, size) -> float32           box-filter average, [..., H, W, C] -> [..., size, size, C]
    gaussian_blur(image, sigma, kernel_size) -> float32
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_model(images) -> np.ndarray:
    """uint8 (or floats in 0..255) -> float32 in [-1, 1], the range the diffusion models learn."""
    return np.asarray(images, np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def to_uint8(x) -> np.ndarray:
    """Floats in [-1, 1] -> uint8, rounded to the nearest level and clipped."""
    return np.clip(np.rint((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def area_resize(images, size: int) -> np.ndarray:
    """Square images [..., H, W, C] (uint8 or float) -> float32 [..., size, size, C] in the same
    value range, each output pixel the mean of the input area it covers. When `size` divides H and
    W this is an exact block mean; otherwise PIL's box filter on each (uint8) image."""
    images = np.asarray(images)
    *lead, h, w, c = images.shape
    if h % size == 0 and w % size == 0:
        blocks = images.astype(np.float32).reshape(*lead, size, h // size, size, w // size, c)
        return blocks.mean(axis=(-4, -2))
    flat = images.reshape(-1, h, w, c).astype(np.uint8)
    out = np.stack(
        [np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BOX)) for im in flat]
    )
    return out.reshape(*lead, size, size, c).astype(np.float32)


def gaussian_kernel(sigma: float, kernel_size: int) -> np.ndarray:
    """The normalised 1-D Gaussian taps at offsets -(k // 2) .. k // 2, float64 [k]."""
    offsets = np.arange(kernel_size, dtype=np.float64) - kernel_size // 2
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def gaussian_blur(image, sigma: float, kernel_size: int = 3) -> np.ndarray:
    """One image [H, W, C] blurred by a separable k x k Gaussian of std `sigma` (pixels), borders
    mirrored without repeating the edge pixel (OpenCV's default); sigma 0 returns it unchanged."""
    image = np.asarray(image, np.float32)
    if sigma <= 0:
        return image
    taps = gaussian_kernel(sigma, kernel_size).astype(np.float32)
    r = kernel_size // 2
    padded = np.pad(image, ((r, r), (r, r), (0, 0)), mode="reflect")
    h, w = image.shape[:2]
    rows = sum(taps[i] * padded[i : i + h] for i in range(kernel_size))
    return sum(taps[i] * rows[:, i : i + w] for i in range(kernel_size)).astype(np.float32)
