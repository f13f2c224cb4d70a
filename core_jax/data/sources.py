"""Data sources and the registry that builds one from `config.data`.

Two kinds, both producing raw examples of the data contract, neither deciding order:
- random access (`shapes`, `tfds`, `folder`, `tokens` (token_shards.py), `embeddings`
  (embedding_shards.py)): `len()` plus `load(i, rng)` (or `src[i]`);
- sequential (`webdataset`): `WebDatasetSource.read(shard, start)` walks one tar shard.
Order, per-process sharding and resumable positions are iterator.py's job.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import functools
import io
import itertools
import os
import posixpath
import tarfile
import zlib

import numpy as np
from braceexpand import braceexpand

from core_jax import storage
from core_jax.data import decode
from core_jax.data.decode import SkipExample
from core_jax.data.embedding_shards import EmbeddingShardSource
from core_jax.data.index_paths import IndexRoot, UnsafePath
from core_jax.data.shapes import ShapesSource, check_fraction, check_train_pairs
from core_jax.data.token_shards import TokenShardSource
from core_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    image_key: str = "image"
    caption_key: str = "caption"
    label_key: str = "label"
    min_side: int = decode.DEFAULT_MIN_SIDE
    max_pixels: int | None = decode.DEFAULT_MAX_PIXELS


def _open_binary(path: str):
    return storage.open(path, "rb")


def _not_found(message: str, path: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, message, path)


# ---------------------------------------------------------------- tfds


def _tfds_data_source(name: str, split: str, data_dir: str):
    """The one call into TFDS (tests replace it to feed examples without TensorFlow)."""
    import tensorflow_datasets as tfds  # lazy: heavy, and only TFDS data needs it

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except tfds.core.DatasetNotFoundError:
        raise ConfigError(f"data.name={name!r} is not a registered TFDS builder") from None
    except (NotImplementedError, AssertionError, FileNotFoundError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            errno.ENOENT,
            f"TFDS {name}:{split} is not prepared as array_record in data.data_dir "
            f"(run `tfds build {name} --file_format=array_record`); {first}",
            data_dir or "~/tensorflow_datasets",
        ) from None


def _lookup(example: dict, path: str):
    """'captions/text' -> example['captions']['text']; None when any part is missing."""
    node = example
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


class TfdsSource:
    """Random access over `tfds.data_source` (array_record / parquet, no TensorFlow needed).

    Several captions per image (coco_captions, `caption_key='captions/text'`): training picks one
    per epoch with the record's rng; eval keeps the first as `caption` and all in `captions`.
    A caption field absent from the dataset (imagenet2012) means no captions, not a skip.
    """

    def __init__(self, name, split, data_dir="", *, train, opts: DecodeOptions, reader=None):
        self.name = f"tfds {name}:{split}"
        self._ds = (reader or _tfds_data_source)(name, split, data_dir)
        self._train, self._opts = train, opts

    def __len__(self):
        return len(self._ds)

    def __getitem__(self, i):
        return self.load(i, None)

    def _captions(self, example):
        value = _lookup(example, self._opts.caption_key) if self._opts.caption_key else None
        if value is None:
            return []
        values = [value] if isinstance(value, (str, bytes)) else list(np.asarray(value).ravel())
        captions, first_error = [], SkipExample("missing_caption")
        for v in values:
            try:
                captions.append(decode.decode_text(v))
            except SkipExample as e:
                first_error = e if first_error.reason == "missing_caption" else first_error
        if not captions:
            raise first_error
        return captions

    def load(self, i, rng):
        o = self._opts
        example = self._ds[int(i)]
        captions = self._captions(example)
        if captions and self._train and rng is not None:
            caption = captions[int(rng.integers(len(captions)))]
        else:
            caption = captions[0] if captions else ""
        image = _lookup(example, o.image_key)
        if image is None:
            raise SkipExample("missing_image", f"{self.name}[{i}]")
        image = decode.check_array_image(image, min_side=o.min_side, max_pixels=o.max_pixels)
        label = decode.parse_label(_lookup(example, o.label_key)) if o.label_key else -1
        return {
            "image": image,
            "caption": caption,
            "captions": captions,
            "label": label,
            "key": f"{self.name}/{int(i)}",
        }


# ---------------------------------------------------------------- folder + index file


def _read_index(path: str) -> list[dict]:
    """CSV/TSV, JSONL or Parquet -> list of row dicts. A bad JSONL line becomes a bad row, not a
    failed run; CSV cells that are not UTF-8 are kept (as surrogates) and skipped per row later."""
    ext = path.lower().rsplit(".", 1)[-1]
    if ext in ("jsonl", "ndjson"):
        rows = []
        with _open_binary(path) as f:
            for line in f:
                if line.strip():
                    try:
                        rows.append(decode.parse_json_object(line))
                    except SkipExample as e:
                        rows.append({"_bad": e.reason})
        return rows
    if ext == "parquet":
        import pyarrow.parquet as pq  # lazy: heavy, and only parquet index files need it

        with _open_binary(path) as f:
            return pq.read_table(f).to_pylist()
    if ext not in ("csv", "tsv"):
        raise ConfigError(f"data.index_file {path!r}: use .csv, .tsv, .jsonl or .parquet")
    with _open_binary(path) as f, io.TextIOWrapper(f, "utf-8", "surrogateescape", newline="") as t:
        return list(csv.DictReader(t, delimiter="\t" if ext == "tsv" else ","))


class FolderSource:
    """A directory of images indexed by a CSV/JSONL/Parquet file of (path, caption).

    Paths are relative to the index file's directory and must stay inside it (index_paths.py):
    a row naming a file elsewhere is a counted skip (`unsafe_path`). An optional `split` column
    selects rows for the requested split; without one every split reads all rows.
    """

    def __init__(self, index_file: str, split: str, *, opts: DecodeOptions):
        if not storage.isfile(index_file):
            raise _not_found("data.index_file not found", index_file)
        self.name = f"folder {index_file}"
        rows = _read_index(index_file)
        columns = set(itertools.chain.from_iterable(r.keys() for r in rows[:1000]))
        path_col = next((c for c in ("path", "file", opts.image_key) if c in columns), None)
        cap_col = next((c for c in (opts.caption_key, "caption", "text") if c and c in columns), None)
        if rows and path_col is None:
            raise ConfigError(
                f"{index_file}: no image path column (looked for 'path', 'file', "
                f"{opts.image_key!r}); columns are {sorted(columns)}"
            )
        if rows and opts.caption_key and cap_col is None:
            raise ConfigError(
                f"{index_file}: no caption column (looked for {opts.caption_key!r}, "
                f"'caption', 'text'); set data.caption_key='' to go without"
            )
        if "split" in columns:
            rows = [r for r in rows if "_bad" in r or str(r.get("split")) == split]
        self._rows = rows
        self._path_col, self._cap_col, self._opts = path_col, cap_col, opts
        remote = storage.is_remote(index_file)
        base = posixpath.dirname(index_file) if remote else os.path.dirname(os.path.abspath(index_file))
        self._root = IndexRoot(base, remote=remote)

    def __len__(self):
        return len(self._rows)

    def __getitem__(self, i):
        return self.load(i, None)

    def load(self, i, rng):
        o, row = self._opts, self._rows[int(i)]
        if "_bad" in row:
            raise SkipExample(row["_bad"])
        caption = ""
        if o.caption_key:
            value = row.get(self._cap_col)
            caption = decode.decode_text(None if _is_nan(value) else value)
        path = row.get(self._path_col)
        if not isinstance(path, str) or not path.strip():
            raise SkipExample("missing_image", f"row {i}")
        try:
            resolved = self._root.resolve(path)
        except UnsafePath as e:
            raise SkipExample("unsafe_path", f"row {i}: {e}") from None
        try:
            with _open_binary(resolved) as f:
                data = f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise SkipExample("missing_image", path) from None
        image = decode.decode_image(data, min_side=o.min_side, max_pixels=o.max_pixels)
        label = decode.parse_label(row.get(o.label_key)) if o.label_key else -1
        return {
            "image": image,
            "caption": caption,
            "captions": [caption] if caption else [],
            "label": label,
            "key": path,
        }


def _is_nan(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)


# ---------------------------------------------------------------- webdataset tar shards


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside braces, so 'a-{0,1}.tar,b.tar' keeps its brace list."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def resolve_shards(urls: str) -> list[str]:
    """Brace patterns, globs and comma lists -> shard paths; anything missing fails here, by name."""
    if not urls or not urls.strip():
        raise ConfigError(
            "data.source='webdataset' needs data.urls (a brace pattern or a "
            "comma-separated list of .tar shards)"
        )
    shards = []
    for pattern in _split_top_level(urls):
        for path in braceexpand(pattern):
            if any(c in path for c in "*?["):
                matches = storage.glob(path)
                if not matches:
                    raise _not_found("no webdataset shard matches this pattern", path)
                shards.extend(matches)
            else:
                shards.append(path)
    local = [p for p in shards if not storage.is_remote(p)]
    for p in local:
        if not os.path.isfile(p.removeprefix("file://")):
            raise _not_found("webdataset shard not found", p)
    remote = [p for p in shards if storage.is_remote(p)]
    if remote:
        storage.check_reachable(remote[0])
        for p in remote[:1] + remote[-1:]:  # one request per shard would stall big bucket lists
            if not storage.exists(p):
                raise _not_found("webdataset shard not found", p)
    return shards


def _split_name(name: str):
    """'dir/000001.jpg' -> ('dir/000001', 'jpg'), as webdataset groups members into samples."""
    base = posixpath.basename(name)
    if "." not in base or base.startswith("."):
        return None, None
    stem, ext = base.split(".", 1)
    return posixpath.join(posixpath.dirname(name), stem), ext.lower()


def _read_tar(path: str, start: int = 0, read_data: bool = True):
    """Yields (sample_index, key, {ext: bytes}, error) from `start` on. A read error ends the shard
    with one error item at the index of the sample it broke (only if that index >= start)."""
    idx, key, files = 0, None, {}
    try:
        with (
            _open_binary(path) as f,
            tarfile.open(fileobj=f, mode="r|*" if storage.is_remote(path) else "r:*") as tar,
        ):
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_name(member.name)
                if k is None:
                    continue
                if k != key:
                    if key is not None:
                        if idx >= start:
                            yield idx, key, files, None
                        idx += 1
                    key, files = k, {}
                if idx >= start and read_data:
                    files[ext] = tar.extractfile(member).read()
            if key is not None and idx >= start:
                yield idx, key, files, None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        if idx >= start:
            yield idx, None, None, repr(e)


def webdataset_captions(urls: str, caption_key: str = "caption", skipped=None):
    """An iterator over the caption of every sample of the shards `urls` names (as data.urls takes
    them), shard after shard, streamed: the `.txt` member, else field `caption_key` of the `.json`.
    Images are not decoded. A missing shard fails here, before the first caption; a sample without
    a usable caption, or the unreadable rest of a shard, is counted in the dict `skipped` (by
    reason) when one is given."""
    return _captions_of(resolve_shards(urls), caption_key, skipped)


def _captions_of(shards: list[str], caption_key: str, skipped):
    for path in shards:
        for _, _key, files, err in _read_tar(path):
            try:
                if err:
                    raise SkipExample("corrupt_shard", f"{path}: {err}")
                meta = decode.parse_json_object(files["json"]) if "json" in files else {}
                yield decode.decode_text(files["txt"] if "txt" in files else meta.get(caption_key))
            except SkipExample as e:
                if skipped is not None:
                    skipped[e.reason] = skipped.get(e.reason, 0) + 1


def _raise_skip(reason, detail, rng):
    raise SkipExample(reason, detail)


_COUNTS: dict = {}


class WebDatasetSource:
    """img2dataset-style tar shards. Only reads: order, sharding and resume live in
    iterator.TarShardStream, since tar members cannot be fetched by index cheaply."""

    def __init__(self, urls: str, *, opts: DecodeOptions, shuffle_buffer: int):
        self.shards = resolve_shards(urls)
        self.name, self.shuffle_buffer, self._opts = f"webdataset {urls}", shuffle_buffer, opts

    def count(self, shard: int) -> int:
        """Records `read(shard)` yields (an unreadable tail counts as one). Cached, since every
        eval pass needs all counts and a bucket shard can only be counted by streaming it."""
        path = self.shards[shard]
        stamp = None if storage.is_remote(path) else os.stat(path.removeprefix("file://"))
        key = (path, stamp and (stamp.st_size, stamp.st_mtime_ns))
        if key not in _COUNTS:
            _COUNTS[key] = sum(1 for _ in _read_tar(path, read_data=False))
        return _COUNTS[key]

    def read(self, shard: int, start: int = 0):
        """Yields (sample index, load) from sample `start` on; load(rng) -> raw example."""
        for idx, key, files, err in _read_tar(self.shards[shard], start):
            if err:
                yield idx, functools.partial(_raise_skip, "corrupt_shard", f"{self.shards[shard]}: {err}")
            else:
                yield idx, functools.partial(self._load, files, f"{shard}/{key}")

    def _load(self, files, key, rng):
        o = self._opts
        return decode.sample_from_files(
            files,
            key,
            caption_key=o.caption_key,
            label_key=o.label_key,
            min_side=o.min_side,
            max_pixels=o.max_pixels,
        )


# ---------------------------------------------------------------- registry


def _opts(cfg) -> DecodeOptions:
    return DecodeOptions(
        image_key=cfg.image_key,
        caption_key=cfg.caption_key,
        label_key=cfg.label_key,
        min_side=int(cfg.min_image_side),
        max_pixels=int(cfg.max_image_pixels) or None,
    )


def _shapes(cfg, split, **_):
    if split != "train":  # test splits keep their fixed mix, so evals stay comparable
        return ShapesSource(split=split)
    fraction = float(cfg.shapes_one_object_fraction)
    try:  # a ConfigError naming the key: the train CLI prints one line and exits 2
        check_fraction(fraction, name="data.shapes_one_object_fraction")
        check_train_pairs(cfg.shapes_train_pairs, name="data.shapes_train_pairs")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return ShapesSource(
        split=split,
        size=int(cfg.shapes_train_size) or None,
        one_object_fraction=fraction,
        train_pairs=cfg.shapes_train_pairs,
    )


def _tfds(cfg, split, *, train):
    if not cfg.name:
        raise ConfigError("data.source='tfds' needs data.name (a TFDS builder, e.g. coco_captions)")
    return TfdsSource(cfg.name, split, cfg.data_dir, train=train, opts=_opts(cfg))


def _pick(cfg, split, key):
    """eval_urls / eval_index_file replace urls / index_file for the eval split when set."""
    value = cfg.get(f"eval_{key}", "") if split == cfg.eval_split and split != cfg.split else ""
    return value or cfg.get(key, "")


def _folder(cfg, split, **_):
    index_file = _pick(cfg, split, "index_file")
    if not index_file and cfg.data_dir:
        candidates = [storage.join(cfg.data_dir, f"index.{e}") for e in ("csv", "jsonl", "parquet")]
        index_file = next((c for c in candidates if storage.isfile(c)), candidates[0])
    if not index_file:
        raise ConfigError("data.source='folder' needs data.index_file (CSV/JSONL/Parquet of path,caption)")
    return FolderSource(index_file, split, opts=_opts(cfg))


def _webdataset(cfg, split, **_):
    return WebDatasetSource(
        _pick(cfg, split, "urls"), opts=_opts(cfg), shuffle_buffer=int(cfg.shuffle_buffer)
    )


def _tokens(cfg, split, **_):
    if not cfg.data_dir:
        raise ConfigError(
            "data.source='tokens' needs data.data_dir (a folder written by "
            "python -m dalle_jax.encode_dataset)"
        )
    return TokenShardSource(cfg.data_dir, split)


def _embeddings(cfg, split, **_):
    if not cfg.get("embeddings_dir", ""):
        raise ConfigError(
            "data.source='embeddings' needs data.embeddings_dir (a folder written by "
            "python -m dalle_jax.unclip.encode_embeddings)"
        )
    return EmbeddingShardSource(cfg.embeddings_dir, split)


SOURCES = {
    "shapes": _shapes,
    "tfds": _tfds,
    "folder": _folder,
    "webdataset": _webdataset,
    "tokens": _tokens,
    "embeddings": _embeddings,
}


def build_source(cfg, split, *, train):
    """A random-access source (`len` + `load(i, rng)` or `[i]`) or a WebDatasetSource."""
    if cfg.source not in SOURCES:
        raise ConfigError(f"data.source={cfg.source!r}; choose one of {sorted(SOURCES)}")
    return SOURCES[cfg.source](cfg, split, train=train)
