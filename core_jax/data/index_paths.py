"""File names read from an index, kept inside the folder the index describes.

An index (a folder source's CSV / JSONL / Parquet file, a shard directory's index.json) is data,
and may come from someone else. A name in it that is absolute, climbs out with `..`, or leads out
through a symlink would let it make a run read any file the user can; `IndexRoot.resolve` refuses
such names before anything outside the root is opened.
"""

from __future__ import annotations

import os
import posixpath


class UnsafePath(ValueError):
    """An index entry that names a file outside the index's root; the message says why."""


class IndexRoot:
    """The folder whose files an index may name. `remote` roots (a bucket URL) are checked by
    the name alone: object stores have no symlinks."""

    def __init__(self, root: str, *, remote: bool = False):
        self.root, self.remote = root, remote
        self._real = root if remote else os.path.realpath(root)

    def resolve(self, name: str) -> str:
        """The path of index entry `name` under the root (local: with symlinks resolved, the path
        that is then opened); UnsafePath when it is absolute, a URL, climbs above the root with
        `..`, or (local) resolves outside it."""
        if "://" in name:
            raise UnsafePath(f"{name!r} is a URL, not a path in the folder")
        if os.path.isabs(name):
            raise UnsafePath(f"{name!r} is absolute, not a path in the folder")
        depth = 0
        for part in name.split("/"):
            depth += -1 if part == ".." else int(part not in ("", "."))
            if depth < 0:
                raise UnsafePath(f"{name!r} climbs out of the folder with '..'")
        if self.remote:
            return posixpath.join(self.root, name)
        real = os.path.realpath(os.path.join(self._real, name))
        if os.path.commonpath([self._real, real]) != self._real:
            raise UnsafePath(f"{name!r} leads out of the folder through a symlink (to {real})")
        return real
