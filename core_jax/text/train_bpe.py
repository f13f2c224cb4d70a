"""Trains a BPE on captions and writes it in CLIP's merges format.

python -m core_jax.text.train_bpe --source shapes --vocab_size 512 --out merges.txt
python -m core_jax.text.train_bpe --captions_file captions.txt --vocab_size 16384 --out m.txt
python -m core_jax.text.train_bpe --webdataset_urls 'gs://B/shards/{00000..00999}.tar' \
    --max_captions 10000000 --vocab_size 16384 --out m.txt

--webdataset_urls takes what config.data.urls takes (brace patterns, globs, comma lists; local,
gs:// or s3://) and streams the captions out of the shards without decoding their images.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import types
from typing import Iterable, Sequence

from core_jax import storage
from core_jax.cli import ArgumentParser
from core_jax.data.sources import webdataset_captions
from core_jax.errors import ConfigError
from core_jax.text.bpe import BPETokenizer, load_captions, train_bpe

# Captions of a streamed source that the longest-caption report tokenizes again: all of them
# would double the run's time on hundreds of millions.
LENGTH_SAMPLE = 100_000

__all__ = ["main", "train_bpe"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m core_jax.text.train_bpe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--source", choices=["shapes"], help="built-in caption source")
    source.add_argument("--captions_file", help="UTF-8 text file (may be gzipped), one caption a line")
    source.add_argument(
        "--webdataset_urls", help="webdataset .tar shards (brace pattern / glob / comma list), streamed"
    )
    parser.add_argument(
        "--caption_key", default="caption", help="webdataset: JSON field read when a sample has no .txt"
    )
    parser.add_argument(
        "--max_captions", type=int, default=0, help="train on the first N captions only (0: all)"
    )
    parser.add_argument(
        "--vocab_size",
        type=int,
        required=True,
        help="ids in all, start/end included (the file may come out smaller)",
    )
    parser.add_argument("--out", required=True, help="merges file to write")
    parser.add_argument(
        "--min_frequency", type=int, default=2, help="a pair seen fewer times in the captions is never merged"
    )
    args = parser.parse_args(argv)

    if args.max_captions < 0:
        parser.error("--max_captions must be >= 0 (0: all)")

    start = time.time()
    skipped: dict[str, int] = {}
    try:
        storage.check_reachable(args.out, args.captions_file)
        if args.webdataset_urls:
            captions: Iterable[str] = webdataset_captions(args.webdataset_urls, args.caption_key, skipped)
        else:
            captions = load_captions(args.source or args.captions_file)
    except (FileNotFoundError, ConfigError) as e:
        parser.error(str(e))
    if args.max_captions:
        captions = itertools.islice(captions, args.max_captions)
    captions = iter(captions)
    # A source with no caption fails before training does, and the BPE trainer's own error
    # (vocab_size too small for no text) does not hide why.
    first = next(captions, None)
    if first is None:
        parser.error("no captions to train on" + (f" (skipped samples: {skipped})" if skipped else ""))
    counted = _Counted(itertools.chain([first], captions))
    train_bpe(counted, args.vocab_size, args.out, min_frequency=args.min_frequency)
    tokenizer = BPETokenizer.from_merges(args.out)
    longest = max(len(ids) for ids in tokenizer.tokenize(counted.first))
    sampled = "" if len(counted.first) == counted.count else f" of the first {len(counted.first)}"
    print(
        f"wrote {args.out}: vocab_size={tokenizer.vocab_size} ({len(tokenizer.merges)} merges) "
        f"from {counted.count} captions in {time.time() - start:.1f}s; "
        f"longest caption{sampled}: {longest} tokens before start/end"
        + (f"; skipped samples: {skipped}" if skipped else "")
    )
    return 0


class _Counted:
    """Passes captions through once, counting them and keeping the first LENGTH_SAMPLE."""

    def __init__(self, captions: Iterable[str]):
        self._captions, self.count, self.first = captions, 0, []

    def __iter__(self):
        for caption in self._captions:
            self.count += 1
            if len(self.first) < LENGTH_SAMPLE:
                self.first.append(caption)
            yield caption


class _CallableModule(types.ModuleType):
    """Importing this module rebinds `core_jax.text.train_bpe` from the function to the module;
    making the module callable keeps `core_jax.text.train_bpe(captions, ...)` working anyway."""

    def __call__(self, *args, **kwargs):
        return train_bpe(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
