"""Files the tests write or read: encoded images, tar shards (img2dataset layout), config files."""

import io
import os
import subprocess
import sys
import tarfile

from PIL import Image

from core_jax.app import load_config  # noqa: F401  (the tests' way to read configs/*.py)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m ARGS` from the repository root, as a user would run it (the 8 fake devices of
    tests/conftest.py's XLA_FLAGS included); output captured."""
    env = dict(
        os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu"
    )
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


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
