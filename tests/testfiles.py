"""Files the tests write or read: encoded images, tar shards (img2dataset layout), config files."""

import io
import tarfile

from PIL import Image

from core_jax.app import load_config  # noqa: F401  (the tests' way to read configs/*.py)


def encode_image(arr, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path, items):
    """A tar shard of (member name, bytes) in the given order."""
    with tarfile.open(path, "w") as tar:
        for name, payload in items:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
