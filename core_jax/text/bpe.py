"""Byte-level BPE tokenizers in the CLIP merges format (OpenAI CLIP's and ones trained here).

One loader serves both kinds of file. The vocabulary is derived from the merges file the way
OpenAI's `SimpleTokenizer` derives it: the 256 byte characters, the same characters with the
end-of-word suffix `</w>`, one entry per merge, then `<|startoftext|>` and `<|endoftext|>`.
Files written by `train_bpe` differ in one respect: their header line lists which byte
characters get a `</w>` entry, because a small vocabulary (DALL-E uses 512) cannot afford all
256 of them. BPE merging itself is done by the HF `tokenizers` library.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import logging
import os
import sys
import unicodedata
from typing import Iterable, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, trainers

from core_jax import storage
from core_jax.data import shapes
from core_jax.errors import ConfigError

try:  # CLIP runs ftfy first; without it we fall back to NFC, as HF's CLIPTokenizerFast does.
    import ftfy
except ImportError:  # pragma: no cover - depends on the environment
    ftfy = None

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
EOW = "</w>"
# OpenAI's SimpleTokenizer keeps merges[1:49152-256-2+1] of its 262k-line file: vocab 49408.
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_MERGES_NAME = "bpe_simple_vocab_16e6.txt.gz"
PAD_MODES = ("zeros", "per_position")
# CLIP's word pattern without its two special tokens, which are matched as added tokens
# instead. (?i) because CLIP compiles it with re.IGNORECASE.
WORD_PATTERN = r"""(?i)'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_EOW_KEY = "end_of_word="

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 map from the 256 byte values to printable characters, in CLIP's vocab order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clean_text(text: str) -> str:
    """CLIP's caption clean-up: ftfy, HTML unescape twice, collapse whitespace, lower-case."""
    # ftfy and the unescaping leave printable ASCII without '&' as it is, and most captions are that:
    # skipping them there takes a shapes caption's clean-up from ~57 to ~1.4 us, same result.
    if not (text.isascii() and text.isprintable() and "&" not in text):
        text = ftfy.fix_text(text) if ftfy is not None else unicodedata.normalize("NFC", text)
        text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def find_open_clip_merges() -> str | None:
    """Path of the merges file shipped in an installed `open_clip`, without importing it (torch)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    dirs = list(spec.submodule_search_locations or [])
    if spec.origin:
        dirs.append(os.path.dirname(spec.origin))
    for d in dirs:
        path = os.path.join(d, CLIP_MERGES_NAME)
        if os.path.isfile(path):
            return path
    return None


def _read_text(path: str) -> str:
    data = storage.read_bytes(path)
    if data[:2] == b"\x1f\x8b":  # by content, not by name: people gunzip and keep the name
        data = gzip.decompress(data)
    return data.decode("utf-8")


def parse_merges(text: str, path: str, max_merges: int | None = None):
    """(merges, end-of-word characters or None meaning all 256) of a merges file's text; `path`
    names the file in errors."""
    lines = text.split("\n")
    header = lines[0] if "#version" in lines[0] else None
    body = lines[1:] if header is not None else lines
    eow_chars = None
    if header is not None:
        for field in header.split():
            if field.startswith(_EOW_KEY):
                eow_chars = field[len(_EOW_KEY) :]
    if max_merges is None and header is not None and "bpe_simple_vocab_16e6" in header:
        max_merges = CLIP_NUM_MERGES
    merges = []
    for lineno, line in enumerate(body, start=2 if header is not None else 1):
        if max_merges is not None and len(merges) >= max_merges:
            break
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f'{path}:{lineno}: expected a merge "a b", got {line!r}')
        merges.append((parts[0], parts[1]))
    return merges, eow_chars


def _pre_tokenizer():
    # use_regex=False: CLIP's pattern alone decides word boundaries, GPT-2's must not split again.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


class BPETokenizer:
    """CLIP-format byte-level BPE tokenizer producing fixed-length int32 id arrays."""

    def __init__(
        self,
        merges: Sequence[tuple[str, str]],
        eow_chars: str | None = None,
        context_length: int = 77,
        pad_mode: str = "zeros",
        path: str | None = None,
        dropout: float = 0.0,
    ):
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        min_length = 2 if pad_mode == "zeros" else 1
        if context_length < min_length:
            raise ValueError(f"context_length must be >= {min_length} for pad_mode={pad_mode!r}")
        byte_chars = list(bytes_to_unicode().values())
        if eow_chars is None:
            eow = byte_chars
        else:
            unknown = set(eow_chars) - set(byte_chars)
            if unknown:
                raise ValueError(f"{path}: end-of-word characters outside the byte alphabet: {unknown}")
            eow = [c for c in byte_chars if c in set(eow_chars)]
        tokens = byte_chars + [c + EOW for c in eow]
        known = set(tokens)
        for i, (a, b) in enumerate(merges):
            if a not in known or b not in known:
                raise ValueError(f"{path}: merge {i + 1} ({a} {b}) uses a token no earlier line makes")
            tokens.append(a + b)
            known.add(a + b)
        tokens += [START_TOKEN, END_TOKEN]
        vocab = {t: i for i, t in enumerate(tokens)}  # later wins, like CLIP's dict(zip(...))
        # Byte fallback for small trained vocabularies: a word-final byte without its own `</w>`
        # entry takes the plain byte's id, so no byte is ever dropped (only a decoded space is).
        for c in byte_chars:
            vocab.setdefault(c + EOW, vocab[c])

        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"BPE dropout must be in [0, 1), got {dropout}")
        # BPE dropout (Provilkov et al. 2020): each merge is skipped with probability `dropout`, so a
        # word may come out in smaller pieces. HF draws from its own thread RNG: not seedable.
        model = models.BPE(
            vocab=vocab,
            merges=list(merges),
            end_of_word_suffix=EOW,
            dropout=float(dropout) if dropout > 0 else None,
        )
        self._tok = Tokenizer(model)
        self._tok.pre_tokenizer = _pre_tokenizer()
        # Special tokens typed in a caption become the special ids, as in OpenAI's and HF's CLIP.
        self._tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in (START_TOKEN, END_TOKEN)]
        )
        byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self._id_bytes = [
            bytes(byte_decoder[c] for c in t[: -len(EOW)]) + b" "
            if t.endswith(EOW)
            else bytes(byte_decoder[c] for c in t)
            for t in tokens[:-2]
        ] + [b"", b""]
        self.merges = list(merges)
        self.eow_chars = None if eow_chars is None else "".join(eow)
        self.path = path
        self.vocab_size = len(tokens)
        self.start_id = vocab[START_TOKEN]
        self.end_id = vocab[END_TOKEN]
        self.context_length = context_length
        self.pad_mode = pad_mode
        self.dropout = float(dropout)

    @classmethod
    def from_merges(
        cls, path: str, context_length: int = 77, pad_mode: str = "zeros", max_merges: int | None = None
    ) -> "BPETokenizer":
        path = os.fspath(path)
        if not storage.isfile(path):
            raise FileNotFoundError(f"BPE merges file not found: {path}")
        return cls.from_merges_text(_read_text(path), path, context_length, pad_mode, max_merges)

    @classmethod
    def from_merges_text(
        cls,
        text: str,
        path: str,
        context_length: int = 77,
        pad_mode: str = "zeros",
        max_merges: int | None = None,
    ) -> "BPETokenizer":
        """from_merges of a merges file's text, as it is (or will be) at `path`."""
        merges, eow_chars = parse_merges(text, path, max_merges)
        return cls(merges, eow_chars, context_length=context_length, pad_mode=pad_mode, path=path)

    def with_dropout(self, dropout: float) -> "BPETokenizer":
        """The same vocabulary with BPE dropout, for encoding training captions only (the ids of
        every piece exist already; eval and sampling keep the deterministic tokenizer)."""
        if float(dropout) == self.dropout:
            return self
        return BPETokenizer(
            self.merges, self.eow_chars, self.context_length, self.pad_mode, self.path, dropout=float(dropout)
        )

    @property
    def total_vocab_size(self) -> int:
        """Rows an embedding table needs: real tokens plus the per-position pads, if any."""
        return self.vocab_size + (self.context_length if self.pad_mode == "per_position" else 0)

    @property
    def max_text_tokens(self) -> int:
        """Tokens of one text that `encode` keeps: the context less the start and end tokens
        (zeros padding) or the end token (per-position pads)."""
        return self.context_length - (2 if self.pad_mode == "zeros" else 1)

    def overlong(self, texts: Sequence[str]) -> list[tuple[int, int]]:
        """(index, token count) of every text longer than `max_text_tokens`, which `encode` cuts."""
        counts = [len(ids) for ids in self.tokenize(texts)]
        return [(i, n) for i, n in enumerate(counts) if n > self.max_text_tokens]

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of the cleaned texts without start/end tokens, padding or truncation."""
        if isinstance(texts, str):
            texts = [texts]
        encodings = self._tok.encode_batch([clean_text(t) for t in texts], add_special_tokens=False)
        return [e.ids for e in encodings]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """int32 [N, context_length]; a single str is treated as a batch of one."""
        ids = self.tokenize(texts)
        length = self.context_length
        if self.pad_mode == "zeros":
            out = np.zeros((len(ids), length), np.int32)
            for row, seq in zip(out, ids):
                seq = seq[: self.max_text_tokens]
                row[0] = self.start_id
                row[1 : len(seq) + 1] = seq
                row[len(seq) + 1] = self.end_id
        else:
            out = np.tile(np.arange(self.vocab_size, self.vocab_size + length, dtype=np.int32), (len(ids), 1))
            for row, seq in zip(out, ids):
                seq = seq[: self.max_text_tokens]
                row[: len(seq)] = seq
                row[len(seq)] = self.end_id
        return out

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode(texts)

    def decode(self, ids) -> str:
        """Text of one id sequence up to its first end token; start tokens and pads are dropped."""
        ids = np.asarray(ids).reshape(-1).tolist()
        if self.end_id in ids:
            ids = ids[: ids.index(self.end_id)]
        data = b"".join(self._id_bytes[i] for i in ids if 0 <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace").strip()

    def decode_batch(self, ids) -> list[str]:
        return [self.decode(row) for row in np.asarray(ids)]

    # HF's own serialisation cannot express the byte-fallback aliases (two strings, one id), so
    # pickling (data workers) rebuilds from the merges instead.
    def __getstate__(self):
        return dict(
            merges=self.merges,
            eow_chars=self.eow_chars,
            context_length=self.context_length,
            pad_mode=self.pad_mode,
            path=self.path,
            dropout=self.dropout,
        )

    def __setstate__(self, state):
        self.__init__(**state)

    def __repr__(self):
        return (
            f"BPETokenizer(path={self.path!r}, vocab_size={self.vocab_size}, "
            f"context_length={self.context_length}, pad_mode={self.pad_mode!r}"
            + (f", dropout={self.dropout}" if self.dropout else "")
            + ")"
        )


def train_bpe(captions: Iterable[str], vocab_size: int, out_path: str, *, min_frequency: int = 2) -> str:
    """Trains a byte-level BPE on cleaned captions and writes it (atomically) in CLIP's format.

    `vocab_size` counts every id, start/end included; the file may come out smaller when the
    captions run out of pairs seen `min_frequency` times. Returns `out_path`.
    """
    out_path = os.fspath(out_path)
    # Several processes may train into one shared workdir: readers must never see half a file.
    storage.write_text(out_path, bpe_merges_text(captions, vocab_size, min_frequency=min_frequency))
    return out_path


def bpe_merges_text(captions: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> str:
    """The merges file train_bpe writes, as text."""
    byte_chars = list(bytes_to_unicode().values())
    tok = Tokenizer(models.BPE(end_of_word_suffix=EOW))
    tok.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=[START_TOKEN, END_TOKEN],
        initial_alphabet=byte_chars,
        end_of_word_suffix=EOW,
    )
    tok.train_from_iterator((clean_text(c) for c in captions), trainer)
    trained_vocab = tok.get_vocab(with_added_tokens=False)
    eow = "".join(c for c in byte_chars if c + EOW in trained_vocab)
    num_merges = vocab_size - len(byte_chars) - len(eow) - 2
    if num_merges < 0:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the captions alone need "
            f"{len(byte_chars) + len(eow) + 2} ids (bytes, word-final bytes, start, end)"
        )
    merges = json.loads(tok.to_str())["model"]["merges"]  # the Python API has no getter
    # The trainer may make one string by two merges; it counts one id, this format counts two.
    merges = [m.split(" ") if isinstance(m, str) else m for m in merges][:num_merges]
    lines = [f"#version: 0.2 core_jax.text.train_bpe {_EOW_KEY}{eow}"]
    lines += [f"{a} {b}" for a, b in merges]
    return "\n".join(lines) + "\n"


def load_captions(source: str) -> list[str]:
    """Captions to train on: 'shapes' (its train split) or a file with one caption per line."""
    if source == "shapes":
        return list(shapes.all_captions("train"))
    path = storage.expanduser(source)
    if not storage.isfile(path):
        raise FileNotFoundError(f"captions file not found: {path}")
    return [line.strip() for line in _read_text(path).splitlines() if line.strip()]


def training_tokenizer(tokenizer: BPETokenizer, text_config) -> BPETokenizer:
    """The tokenizer for training captions: `tokenizer` with `text_config.bpe_dropout` (absent or 0 =
    `tokenizer` itself). Never for eval, generation or zero-shot prompts."""
    get = text_config.get if hasattr(text_config, "get") else lambda k, d=None: getattr(text_config, k, d)
    dropout = float(get("bpe_dropout", 0.0) or 0.0)
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"config.text.bpe_dropout must be in [0, 1), got {dropout}")
    return tokenizer.with_dropout(dropout) if dropout else tokenizer


def _trained_source(source: str) -> str:
    return source if source == "shapes" else storage.absolute(source)


def _main_process() -> bool:
    """Process 0 of a multi-process JAX run, or a run without JAX (the train-bpe command, which
    never imports it): looked up, not imported, so this module loads without JAX."""
    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0


def _write_json(path: str, record: dict) -> None:
    # Whole or not at all: processes training into one shared workdir write the same.
    storage.write_text(path, json.dumps(record, indent=1))


def _check_workdir_merges(path: str, workdir: str, wanted: dict) -> None:
    """A merges file already in the workdir (a resumed run, or one a failed run left) must be what
    the config asks for: its record (merges.json, written when it was trained) or, for files without
    one, the workdir's config.json. A mismatch is one ConfigError line; nothing to compare, no check."""
    record_path = os.path.splitext(path)[0] + ".json"
    if storage.isfile(record_path):
        had = json.loads(storage.read_text(record_path))
        had = {k: had.get(k) for k in wanted}
    else:
        config_path = storage.join(workdir, "config.json")
        if not storage.isfile(config_path):
            return
        old = json.loads(storage.read_text(config_path))
        text = old.get("text", {})
        if text.get("merges_file"):
            raise ConfigError(
                f"{path} is a copy of text.merges_file={text['merges_file']!r} (the "
                f"workdir's config.json) but text.merges_file is '' now; set it back, or "
                f"delete {storage.dirname(path)} to train a new tokenizer"
            )
        source = text.get("train_source") or (
            "shapes" if old.get("data", {}).get("source", "shapes") == "shapes" else None
        )
        had = dict(
            vocab_size=text.get("vocab_size"), train_source=_trained_source(source) if source else None
        )
    if had != wanted:
        raise ConfigError(
            f"{path} was trained with vocab_size={had['vocab_size']} on {had['train_source']!r} but "
            f"config.text asks for vocab_size={wanted['vocab_size']} on {wanted['train_source']!r}; "
            f"set text.vocab_size / text.train_source back, or delete {storage.dirname(path)} to "
            f"train a new tokenizer"
        )


def tokenizer_from_config(
    text_config, workdir: str | None = None, *, data_source: str | None = None
) -> BPETokenizer:
    """Builds the tokenizer `config.text` describes, training one into the workdir if needed.

    With text.merges_file '' the BPE is trained on text.train_source; train_source '' means the
    shapes captions when `data_source` (config.data.source) is 'shapes' and is an error otherwise,
    so that no run on other data trains its tokenizer on the shapes captions by default.
    `bpe_dropout` is not applied here: see `BPETokenizer.with_dropout`, for training batches only.
    """

    def get(key, default=None):
        if hasattr(text_config, "get"):
            return text_config.get(key, default)
        return getattr(text_config, key, default)

    merges_file = get("merges_file", "") or ""
    trained = None  # the merges trained here, when they were
    if merges_file == "open_clip":
        path = find_open_clip_merges()
        if path is None:
            raise FileNotFoundError(
                f"merges_file='open_clip' but no installed open_clip package has {CLIP_MERGES_NAME}; "
                "pip install open_clip_torch (it is not imported) or set merges_file to the file"
            )
    elif merges_file:
        path = storage.expanduser(merges_file)
        if not storage.isfile(path):
            raise FileNotFoundError(f"text.merges_file not found: {path}")
    else:
        if workdir is None:
            raise ValueError("text.merges_file is empty, so a workdir is needed to train one into")
        source = get("train_source", "") or ("shapes" if data_source == "shapes" else "")
        if not source:
            raise ConfigError(
                "text.merges_file and text.train_source are both '', which trains the tokenizer on the "
                f"shapes captions only for data.source=shapes (this run: {data_source!r}); set "
                "text.merges_file to a merges file ('open_clip' for CLIP's) or text.train_source to a "
                "file of your captions, one a line ('shapes' to train on the shapes captions anyway)"
            )
        vocab_size = get("vocab_size")
        if not vocab_size:
            raise ValueError("text.vocab_size is needed to train a BPE (text.merges_file is empty)")
        path = storage.join(workdir, "tokenizer", "merges.txt")
        wanted = dict(vocab_size=int(vocab_size), train_source=_trained_source(source))
        # An existing file wins over retraining (a resumed run must keep the ids it trained with),
        # but only when it was trained from what the config asks for.
        if storage.isfile(path):
            _check_workdir_merges(path, workdir, wanted)
        else:
            log.info("training a %d-token BPE on %s into %s", vocab_size, source, path)
            trained = bpe_merges_text(load_captions(source), int(vocab_size))
            # Every process trains the same merges; the first writes them.
            if _main_process():
                storage.makedirs(storage.dirname(path))
                # The record first: a crash between the two leaves no merges file without its record.
                _write_json(os.path.splitext(path)[0] + ".json", wanted)
                storage.write_text(path, trained)
    options = dict(
        context_length=int(get("context_length", 77)),
        pad_mode=get("pad_mode", "zeros"),
        max_merges=get("max_merges", None),
    )
    if trained is not None:
        tokenizer = BPETokenizer.from_merges_text(trained, path, **options)
    else:
        tokenizer = BPETokenizer.from_merges(path, **options)
    configured = get("vocab_size")
    if configured and tokenizer.vocab_size > int(configured):
        log.warning(
            "%s has %d tokens, more than text.vocab_size=%s; models must size their "
            "embeddings from tokenizer.total_vocab_size",
            path,
            tokenizer.vocab_size,
            configured,
        )
    return tokenizer
