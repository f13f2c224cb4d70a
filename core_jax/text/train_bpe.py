"""Trains a BPE on captions and writes it in CLIP's merges format.

python -m core_jax.text.train_bpe --source shapes --vocab_size 512 --out merges.txt
python -m core_jax.text.train_bpe --captions_file captions.txt --vocab_size 16384 --out m.txt
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from typing import Sequence

from core_jax import storage
from core_jax.cli import ArgumentParser
from core_jax.errors import ConfigError
from core_jax.text.bpe import BPETokenizer, load_captions, train_bpe

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

    start = time.time()
    try:
        storage.check_reachable(args.out, args.captions_file)
        captions = load_captions(args.source or args.captions_file)
    except (FileNotFoundError, ConfigError) as e:
        parser.error(str(e))
    if not captions:
        parser.error("no captions to train on")
    train_bpe(captions, args.vocab_size, args.out, min_frequency=args.min_frequency)
    tokenizer = BPETokenizer.from_merges(args.out)
    longest = max(len(ids) for ids in tokenizer.tokenize(captions))
    print(
        f"wrote {args.out}: vocab_size={tokenizer.vocab_size} ({len(tokenizer.merges)} merges) "
        f"from {len(captions)} captions in {time.time() - start:.1f}s; "
        f"longest caption: {longest} tokens before start/end"
    )
    return 0


class _CallableModule(types.ModuleType):
    """Importing this module rebinds `core_jax.text.train_bpe` from the function to the module;
    making the module callable keeps `core_jax.text.train_bpe(captions, ...)` working anyway."""

    def __call__(self, *args, **kwargs):
        return train_bpe(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
