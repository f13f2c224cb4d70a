"""A local folder that mirrors a bucket folder, for writers that can only append to local files
(metrics.jsonl, TensorBoard's event files): they write into a cache folder, and `sync` uploads
every file in it whole. Bucket objects cannot be appended to, and tensorboardX's own bucket support
is not reliable; re-uploading a small file at each flush is.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from core_jax import storage


def cache_root() -> str:
    """Where mirrors live: $XDG_CACHE_HOME/dalle-clip-jax (~/.cache/dalle-clip-jax)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dalle-clip-jax")


class Mirror:
    """`local` is the folder to write into. For a local `target` it is `target` itself and `sync`
    does nothing; for a URL it is a fresh cache folder, filled first with the files named in
    `download` that already exist there (to append to), and removed by `close`."""

    def __init__(self, target: str, download: tuple[str, ...] = ()):
        self.target = target
        self.remote = storage.is_remote(target)
        if not self.remote:
            self.local = target
            os.makedirs(target, exist_ok=True)
            return
        os.makedirs(cache_root(), exist_ok=True)
        self.local = tempfile.mkdtemp(prefix="mirror-", dir=cache_root())
        for name in download:
            src = storage.join(target, name)
            if storage.exists(src):
                storage.copy_file(src, os.path.join(self.local, name))

    def sync(self) -> None:
        """Uploads every file under the cache folder to the same relative path under `target`."""
        if not self.remote:
            return
        for folder, _, files in os.walk(self.local):
            rel = os.path.relpath(folder, self.local)
            for name in files:
                dst = storage.join(self.target, *([] if rel == "." else rel.split(os.sep)), name)
                storage.copy_file(os.path.join(folder, name), dst)

    def close(self) -> None:
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)
