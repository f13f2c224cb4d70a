"""One filesystem for every path a command reads or writes: a local path or any fsspec URL
(`gs://`, `s3://`, ...). Local paths go straight to `os` (no behaviour change, no overhead); URLs
go through fsspec, which reaches buckets through gcsfs / s3fs (the `[gcs]` / `[s3]` extras).
Checkpoints go through orbax, which writes local paths and gs:// itself (core_jax/checkpoint.py).
"""

from __future__ import annotations

import builtins
import glob as globlib
import io
import logging
import os
import posixpath
import shutil
import tempfile
from typing import IO

import fsspec
import numpy as np
from PIL import Image

from core_jax.errors import ConfigError

# The extra that brings each protocol's fsspec implementation.
EXTRAS = {"gs": "gcs", "gcs": "gcs", "s3": "s3", "s3a": "s3"}
# Stores whose folders are only key prefixes: nothing to create before writing under one.
_PREFIX_STORES = {"gs", "gcs", "s3", "s3a", "az", "abfs", "memory"}


def is_remote(path) -> bool:
    """True for a URL (`gs://bucket/run`); False for a local path (`file://` URLs included)."""
    path = os.fspath(path)
    return "://" in path and not path.startswith("file://")


def _local(path) -> str:
    return os.fspath(path).removeprefix("file://")


def protocol(path) -> str:
    return os.fspath(path).split("://", 1)[0] if is_remote(path) else "file"


def _fs(path):
    """(fsspec filesystem, path within it) of a URL; a missing extra is a ConfigError naming it."""
    try:
        return fsspec.core.url_to_fs(os.fspath(path))
    except ImportError as e:
        raise ConfigError(_missing_extra(path, e)) from None
    except ValueError as e:  # an unknown protocol
        raise ConfigError(f"{path}: {e}") from None


def _missing_extra(path, e: ImportError) -> str:
    extra = EXTRAS.get(protocol(path))
    if extra is None:
        return f"{path}: {e}"
    module = "gcsfs" if extra == "gcs" else "s3fs"
    return f"{path} needs {module}: pip install 'dalle-clip-jax[{extra}]'"


def join(base, *parts: str) -> str:
    base = os.fspath(base)
    return posixpath.join(base, *parts) if is_remote(base) else os.path.join(_local(base), *parts)


def dirname(path) -> str:
    path = os.fspath(path)
    return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(_local(path))


def basename(path) -> str:
    path = os.fspath(path)
    return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(_local(path))


def absolute(path) -> str:
    """A URL as it is; a local path made absolute (`~` expanded)."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(_local(path)))


def expanduser(path) -> str:
    """A URL as it is; `~` expanded in a local path."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.expanduser(_local(path))


def open(path, mode: str = "r", **kwargs) -> IO:  # noqa: A001 (the layer's open, by design)
    """A file object like builtins.open's, for a local path or a URL. A URL opened for writing is
    uploaded when the file is closed: use it in a `with` block."""
    if not is_remote(path):
        return builtins.open(_local(path), mode, **kwargs)
    fs, p = _fs(path)
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    return fs.open(p, mode, **kwargs)


def read_text(path) -> str:
    with open(path, "r", encoding="utf-8") as f:
        return f.read()


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_text(path, text: str) -> None:
    """Writes `text` whole: a reader never sees half a file (local: a temp file renamed over it;
    a bucket's objects appear whole when their upload finishes)."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path, data: bytes) -> None:
    if is_remote(path):
        with open(path, "wb") as f:
            f.write(data)
        return
    path = _local(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_png(path, image) -> None:
    """A uint8 [H, W, C] array (or a PIL image) as a PNG file, written whole (see write_bytes)."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())


def makedirs(path) -> None:
    """Creates the folder and its parents (exist_ok); on a bucket folders are key prefixes, so
    nothing needs creating."""
    if not is_remote(path):
        os.makedirs(_local(path), exist_ok=True)
    elif protocol(path) not in _PREFIX_STORES:
        fs, p = _fs(path)
        fs.makedirs(p, exist_ok=True)


def exists(path) -> bool:
    if not is_remote(path):
        return os.path.exists(_local(path))
    fs, p = _fs(path)
    return fs.exists(p)


def isfile(path) -> bool:
    if not is_remote(path):
        return os.path.isfile(_local(path))
    fs, p = _fs(path)
    return fs.isfile(p)


def isdir(path) -> bool:
    """On a bucket: some object lies under the prefix."""
    if not is_remote(path):
        return os.path.isdir(_local(path))
    fs, p = _fs(path)
    return fs.isdir(p)


def listdir(path) -> list[str]:
    """The names (not paths) directly inside a folder, sorted."""
    if not is_remote(path):
        return sorted(os.listdir(_local(path)))
    fs, p = _fs(path)
    return sorted(
        posixpath.basename(e.rstrip("/")) for e in fs.ls(p, detail=False) if e.rstrip("/") != p.rstrip("/")
    )


def files_in(path) -> list[str]:
    """The names of the files (not folders) directly inside a folder, sorted; one listing request
    on a bucket."""
    if not is_remote(path):
        local = _local(path)
        return sorted(n for n in os.listdir(local) if os.path.isfile(os.path.join(local, n)))
    fs, p = _fs(path)
    return sorted(
        posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(p, detail=True) if e["type"] == "file"
    )


def glob(pattern) -> list[str]:
    """Paths matching a glob pattern, sorted; URLs keep their protocol."""
    if not is_remote(pattern):
        return sorted(globlib.glob(_local(pattern)))
    fs, p = _fs(pattern)
    return sorted(fs.unstrip_protocol(m) for m in fs.glob(p))


def copy_file(src, dst) -> None:
    """Copies one file across filesystems (local to bucket, bucket to local, ...)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)


class RangeReader:
    """Byte ranges of one file, read from many threads at once: os.pread on a local file, one
    ranged request per read on a bucket (no shared file position either way)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._file = None if is_remote(path) else builtins.open(_local(path), "rb")
        if self._file is None:
            self._fs, self._key = _fs(path)

    def read(self, offset: int, size: int) -> bytes:
        if self._file is not None:
            return os.pread(self._file.fileno(), size, offset)
        return self._fs.cat_file(self._key, start=offset, end=offset + size)


def _bucket(path) -> str:
    """`gs://bucket` of `gs://bucket/a/b`."""
    scheme, rest = os.fspath(path).split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


# S3: one try, not botocore's retries with back-off, before an unreachable endpoint is reported
# (the commands themselves keep the defaults). gcsfs fixes its retries per class: an unreachable
# GCS endpoint is reported after them (about half a minute).
_PROBE_OPTIONS = {"gcs": {}, "s3": {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 10}}}


def check_reachable(*paths) -> None:
    """Raises ConfigError (one line) when a URL among `paths` cannot be used: its filesystem's
    extra is not installed, or its bucket does not exist or cannot be reached. Entry points call it
    where they resolve their paths, before writing anything anywhere. Local paths and empty values
    pass through."""
    for path in paths:
        if not path or not is_remote(path):
            continue
        _fs(path)  # a missing extra, named
        extra = EXTRAS.get(protocol(path))
        if extra is None:  # another fsspec store: its own errors will say what is wrong
            continue
        bucket = _bucket(path)
        # The clients log every failed try with a traceback; the error line below says it once.
        quiet = [logging.getLogger(name) for name in ("gcsfs", "s3fs", "aiobotocore", "botocore")]
        levels = [logger.level for logger in quiet]
        try:
            for logger in quiet:
                logger.setLevel(logging.CRITICAL)
            fs = fsspec.filesystem(protocol(path), **_PROBE_OPTIONS[extra], skip_instance_cache=True)
            fs.ls(bucket.split("://", 1)[1], detail=False)
        except FileNotFoundError:
            raise ConfigError(f"bucket {bucket} does not exist (for {path})") from None
        except Exception as e:  # any transport or permission failure: the bucket cannot be used
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"cannot reach {bucket} (for {path}): {detail}") from None
        finally:
            for logger, level in zip(quiet, levels):
                logger.setLevel(level)
