"""Untrusted bytes -> the pieces of a raw example, turning every kind of bad input into SkipExample.

Images are rejected by the size in their header before any pixel is decoded, so a 20000x20000
PNG costs one header read, not 1.2 GB of memory. Every failure has a short reason string; the
iterator counts them (`it.skipped`) and the trainer logs them as `data/skipped/<reason>`.
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
from PIL import Image

from core_jax.data import image_ops
from core_jax.errors import RunError

# Defaults (also in default_data_config): 8 px is the smallest side worth up-sampling to a
# training resolution; 100M pixels (10000x10000) admits any real photo while keeping a single
# decode under ~300 MB of RGB.
DEFAULT_MIN_SIDE = 8
DEFAULT_MAX_PIXELS = 10000 * 10000

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm")

# The reasons this package produces (example_fn may add its own through SkipExample).
REASONS = {
    "empty_file": "zero-byte image file",
    "corrupt_image": "image bytes PIL cannot open or fully decode (corrupt or truncated)",
    "too_small": "shorter side below data.min_image_side (header check)",
    "too_large": "more pixels than data.max_image_pixels (header check, pixels never decoded)",
    "missing_image": "no image in the sample / the indexed file does not exist",
    "unsafe_path": "the index names a file outside its folder (absolute, '..' or a symlink out)",
    "missing_caption": "no caption field, file or column value",
    "empty_caption": "caption is empty or only whitespace",
    "non_utf8": "caption bytes are not valid UTF-8",
    "bad_json": "JSON sidecar or JSONL line does not parse, is not an object, or has a non-string caption",
    "corrupt_shard": "tar shard unreadable from this point on; the rest of the shard is skipped",
}


class SkipExample(Exception):
    """Raised by sources or `example_fn(raw, rng)` to drop one example; counted under `reason`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class NoUsableExamples(RunError):
    """A whole pass over a source produced nothing usable; raised instead of looping forever
    (entry points print it as one `error:` line)."""


def _check_size(width: int, height: int, min_side: int, max_pixels: int | None) -> None:
    if max_pixels and width * height > max_pixels:
        raise SkipExample("too_large", f"{width}x{height}")
    if min(width, height) < min_side:
        raise SkipExample("too_small", f"{width}x{height}")


def decode_image(
    data: bytes, *, min_side: int = DEFAULT_MIN_SIDE, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 3] RGB (EXIF orientation applied)."""
    if not data:
        raise SkipExample("empty_file")
    # PIL refuses > 2*MAX_IMAGE_PIXELS on open; lift its guard only as far as our own limit so a
    # configured max above PIL's default is honoured and the header check below stays the gate.
    if max_pixels and Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # parses the header only
    except Image.DecompressionBombError as e:
        raise SkipExample("too_large", str(e)) from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        raise SkipExample("corrupt_image", repr(e)) from None
    _check_size(img.width, img.height, min_side, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Palette images with Transparency"
            img.load()
            return image_ops.pil_to_rgb(image_ops.exif_transpose(img))
    except SkipExample:
        raise
    except Exception as e:
        raise SkipExample("corrupt_image", repr(e)) from None


def check_array_image(
    img, *, min_side: int = DEFAULT_MIN_SIDE, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """An already-decoded image (e.g. from TFDS) -> uint8 [H, W, 3] RGB, with the same size checks."""
    if isinstance(img, (bytes, bytearray)):
        return decode_image(bytes(img), min_side=min_side, max_pixels=max_pixels)
    arr = np.asarray(img)
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise SkipExample("corrupt_image", f"array of shape {arr.shape}")
    _check_size(arr.shape[1], arr.shape[0], min_side, max_pixels)
    return image_ops.array_to_rgb(arr)


def decode_text(data: bytes | str | None) -> str:
    """Caption bytes -> stripped str; missing, empty and non-UTF-8 captions raise SkipExample."""
    if data is None:
        raise SkipExample("missing_caption")
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise SkipExample("non_utf8") from None
    elif not isinstance(data, str):
        raise SkipExample("bad_json", f"caption of type {type(data).__name__}")
    else:
        try:  # csv read with surrogateescape keeps undecodable bytes as lone surrogates
            data.encode("utf-8")
        except UnicodeEncodeError:
            raise SkipExample("non_utf8") from None
    text = data.strip()
    if not text:
        raise SkipExample("empty_caption")
    return text


def example_caption(raw: dict, rng, train: bool) -> str:
    """The caption a text-conditioned model trains on: a random one of the example's non-empty
    `captions` in training, else its `caption` (or the first); none is a counted skip."""
    captions = [c for c in (raw.get("captions") or []) if c and c.strip()]
    if train and len(captions) > 1:
        caption = captions[int(rng.integers(len(captions)))]
    else:
        caption = raw.get("caption") or (captions[0] if captions else "")
    if not caption.strip():
        raise SkipExample("empty_caption")
    return caption


def parse_json_object(data: bytes | str) -> dict:
    """JSON sidecar / JSONL line -> dict, or SkipExample('bad_json' | 'non_utf8')."""
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise SkipExample("non_utf8") from None
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        raise SkipExample("bad_json") from None
    if not isinstance(obj, dict):
        raise SkipExample("bad_json", f"top level is {type(obj).__name__}, not an object")
    return obj


def parse_label(value) -> int:
    """A class label from a .cls file, a JSON field or a TFDS feature; -1 when absent or unparsable."""
    if value is None:
        return -1
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    try:
        return int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        return -1


def sample_from_files(
    files: dict[str, bytes],
    key: str,
    *,
    caption_key: str,
    label_key: str,
    min_side: int,
    max_pixels: int | None,
) -> dict:
    """A webdataset sample {ext: bytes} (img2dataset layout) -> raw example.

    Caption: `KEY.txt`, else field `caption_key` of `KEY.json`. With `caption_key=''` captions are
    not required (dVAE on unlabeled images). Text is checked before pixels are decoded.
    """
    meta = parse_json_object(files["json"]) if "json" in files else {}
    caption = ""
    if caption_key:
        caption = decode_text(files["txt"] if "txt" in files else meta.get(caption_key))
    if "cls" in files:
        label = parse_label(files["cls"])
    else:
        label = parse_label(meta.get(label_key)) if label_key else -1
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    if ext is None:
        raise SkipExample("missing_image", key)
    image = decode_image(files[ext], min_side=min_side, max_pixels=max_pixels)
    return {
        "image": image,
        "caption": caption,
        "captions": [caption] if caption else [],
        "label": label,
        "key": key,
    }
