"""`data.source='tokens'`: pre-encoded image-token shards (what `dalle_jax.encode_dataset` writes).

A directory D (`data.data_dir`) holding D/index.json and, per split, `<split>-NNNNN.npz` files with
`tokens` int [N, grid, grid] (or [N, grid*grid]), `captions` and `keys` (unicode arrays). Examples
carry `image_tokens` instead of an image, so a transformer trains without running an image encoder.

Host memory does not grow with the dataset: opening a split reads only each shard's zip directory
and array headers, and every example is one positioned read (`os.pread`) per array straight from
the file, so every process of a pod job can address a split of any size (the page cache, not each
process, holds what is hot). That needs the members stored uncompressed, as `np.savez` (and so
encode_dataset) writes them; a shard written with `np.savez_compressed` is decompressed into memory
when the split is opened.
"""

from __future__ import annotations

import collections
import json
import os
import struct
import threading
import zipfile

import numpy as np

from core_jax import storage
from core_jax.data.decode import SkipExample
from core_jax.data.index_paths import IndexRoot, UnsafePath
from core_jax.errors import ConfigError

_COLUMNS = ("tokens", "captions", "keys")
_OPEN_FILES = 64  # shards kept open at once (a global shuffle touches every shard)


def read_index(data_dir: str) -> dict:
    path = storage.join(data_dir, "index.json")
    if not storage.isfile(path):
        raise FileNotFoundError(
            f"data.source='tokens': no index.json in data.data_dir={data_dir!r} "
            f"(write one with python -m dalle_jax.encode_dataset --out_dir DIR)"
        )
    with storage.open(path) as f:
        try:
            index = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    for key in ("grid_size", "vocab_size", "splits"):
        if key not in index:
            raise ValueError(f"{path}: missing {key!r}")
    return index


class _Column:
    """One array of one shard: rows read from the file at a fixed offset, or held in memory."""

    def __init__(self, shape, dtype, offset=None, array=None):
        self.shape, self.dtype, self.offset, self.array = tuple(shape), np.dtype(dtype), offset, array
        self.row_items = int(np.prod(self.shape[1:], dtype=np.int64))
        self.row_bytes = self.row_items * self.dtype.itemsize

    def row(self, reader: storage.RangeReader, i: int) -> np.ndarray:
        if self.array is not None:
            return self.array[i]
        data = reader.read(self.offset + i * self.row_bytes, self.row_bytes)
        if len(data) != self.row_bytes:
            raise OSError(f"short read ({len(data)} of {self.row_bytes} bytes)")
        return np.frombuffer(data, self.dtype).reshape(self.shape[1:])


def _npy_header(f):
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read:
        raise ValueError(f"unsupported .npy format version {version}")
    return read[version](f)  # (shape, fortran_order, dtype)


def _open_columns(path: str, names=_COLUMNS) -> dict[str, _Column]:
    """The shard's arrays `names` (those present): stored (uncompressed) members by file offset,
    others loaded."""
    columns = {}
    with storage.open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        members = {os.path.splitext(i.filename)[0]: i for i in zf.infolist()}
        for name in names:
            info = members.get(name)
            if info is None:
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                with zf.open(info) as member:
                    array = np.lib.format.read_array(member, allow_pickle=False)
                columns[name] = _Column(array.shape, array.dtype, array=array)
                continue
            f.seek(info.header_offset)
            local = f.read(30)  # the zip local file header; data follows its name and extra field
            if local[:4] != b"PK\x03\x04":
                raise ValueError(f"{path}: member {info.filename} has no local zip header")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            shape, fortran, dtype = _npy_header(f)
            if dtype.hasobject:
                raise ValueError(f"{path}: {name} holds Python objects; write unicode arrays (dtype=str)")
            if fortran and len(shape) > 1:
                raise ValueError(f"{path}: {name} is stored in Fortran order; write it C-contiguous")
            columns[name] = _Column(shape, dtype, offset=f.tell())
    return columns


def listed_shards(data_dir: str, index: dict, split: str, *, source: str, writer: str) -> list[tuple]:
    """(name, path) of each shard `index` (data_dir/index.json, read) lists for `split`, the path
    resolved inside data_dir (index_paths.IndexRoot) and checked to exist; nothing is opened. A
    split the index lacks or a missing shard is a ValueError / FileNotFoundError; a shard named
    outside data_dir is a ConfigError naming the index and the entry (`source` and `writer` name
    the data source and the command that writes its shards, for the messages)."""
    if split not in index["splits"]:
        raise ValueError(
            f"{source}: split {split!r} is not in {data_dir}/index.json "
            f"(it has {sorted(index['splits'])}); encode it with {writer}"
        )
    root, shards = IndexRoot(data_dir, remote=storage.is_remote(data_dir)), []
    listings: dict[str, set[str]] = {}  # a bucket: one listing per folder, not a request per shard

    def exists(path: str) -> bool:
        if not storage.is_remote(path):
            return storage.isfile(path)
        folder = storage.dirname(path)
        if folder not in listings:
            try:
                listings[folder] = set(storage.files_in(folder))
            except FileNotFoundError:
                listings[folder] = set()
        return storage.basename(path) in listings[folder]

    for shard in index["splits"][split]["shards"]:
        try:
            path = root.resolve(str(shard))
        except UnsafePath as e:
            raise ConfigError(
                f"{storage.join(data_dir, 'index.json')}: split {split!r} lists a shard outside "
                f"{data_dir}: {e}; shard names must name files in that folder"
            ) from None
        if not exists(path):
            raise FileNotFoundError(f"{data_dir}/index.json lists {shard}, which does not exist")
        shards.append((str(shard), path))
    return shards


class ShardRows:
    """Random access to the rows of one split of a shard directory: the .npz files its index
    lists, each a set of equal-length arrays (`COLUMNS`, of which `REQUIRED` must be there) read
    one row at a time from a few open files. Subclasses check each shard (`check_shard`) and
    make an example of a row (`load`). A shard name that leads out of the directory (absolute,
    `..`, a symlink out) is a ConfigError naming the index and the entry: nothing outside it is
    opened."""

    COLUMNS: tuple[str, ...] = ()
    REQUIRED: tuple[str, ...] = ()
    source = ""  # how errors name the source
    kind = ""  # "token shard", ...
    writer = ""  # the command that writes such shards

    def __init__(self, data_dir: str, split: str, index: dict, name: str):
        shards = listed_shards(data_dir, index, split, source=self.source, writer=self.writer)
        self.name = name
        self._paths, self._columns, counts = [], [], []
        for shard, path in shards:
            try:
                columns = _open_columns(path, self.COLUMNS)
            except (zipfile.BadZipFile, ValueError, OSError) as e:
                raise ValueError(f"{path}: not a readable {self.kind} ({e})") from None
            missing = [key for key in self.REQUIRED if key not in columns]
            if missing:
                raise ValueError(
                    f"{path}: no {' or '.join(map(repr, missing))} array ({self.writer.split()[0]} "
                    f"writes {', '.join(self.COLUMNS)})"
                )
            self.check_shard(path, shard, columns)
            n = columns[self.REQUIRED[0]].shape[0]
            if any(c.shape[0] != n for c in columns.values()):
                raise ValueError(f"{path}: its arrays differ in length")
            self._paths.append(path)
            self._columns.append(columns)
            counts.append(n)
        if not self._paths:
            raise ValueError(f"{self.source}: split {split!r} of {data_dir} has no shards")
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._files = collections.OrderedDict()  # shard -> its RangeReader (LRU)
        self._lock = threading.Lock()

    def check_shard(self, path: str, shard: str, columns: dict) -> None:
        """Raises ValueError when a shard's arrays do not fit the index."""

    def __len__(self):
        return int(self._starts[-1])

    def __getitem__(self, i):
        return self.load(i, None)

    def _file(self, shard: int):
        # An evicted file closes when the last reader drops it, never under a reader's pread.
        with self._lock:
            f = self._files.pop(shard, None)
            if f is None:
                f = storage.RangeReader(self._paths[shard])
                while len(self._files) >= _OPEN_FILES:
                    self._files.popitem(last=False)
            self._files[shard] = f
            return f

    def row(self, i) -> dict[str, np.ndarray]:
        """Row `i` of the split, every array of its shard; a shard deleted or cut short while
        the run reads it is a counted skip."""
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.name}: index {i} out of range for {len(self)} examples")
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        row, columns = i - int(self._starts[shard]), self._columns[shard]
        try:
            f = self._file(shard)  # held while reading: an evicted file closes when dropped
            return {key: column.row(f, row) for key, column in columns.items()}
        except OSError as e:
            raise SkipExample("unreadable_shard", f"{self._paths[shard]}: {e}") from None

    def load(self, i, rng) -> dict:
        raise NotImplementedError


class TokenShardSource(ShardRows):
    """Random access over one split of a token-shard directory."""

    COLUMNS, REQUIRED = _COLUMNS, ("tokens", "captions")
    source, kind, writer = "data.source='tokens'", "token shard", "encode_dataset --splits"

    def __init__(self, data_dir: str, split: str):
        index = read_index(data_dir)
        self.grid_size, self.vocab_size = int(index["grid_size"]), int(index["vocab_size"])
        super().__init__(data_dir, split, index, name=f"tokens {data_dir} [{split}]")

    def check_shard(self, path, shard, columns):
        if columns["tokens"].row_items != self.grid_size * self.grid_size:
            raise ValueError(
                f"{self.name}: {shard} holds {columns['tokens'].row_items} tokens per "
                f"image, index.json says a {self.grid_size}x{self.grid_size} grid"
            )

    def load(self, i, rng):
        out = self.row(i)
        tokens = out["tokens"].reshape(-1).astype(np.int32)
        caption = str(out["captions"])
        key = str(out.get("keys", "")) or f"{int(i)}"
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise SkipExample("bad_tokens", key)
        return {
            "image_tokens": tokens,
            "caption": caption,
            "captions": [caption] if caption else [],
            "label": -1,
            "key": key,
        }
