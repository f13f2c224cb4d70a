"""How every command fails: one `error: ...` line on stderr and exit code 2.

A leaf (argparse and sys only), so a tool that only needs these loads neither JAX nor the trainer
before parsing its flags; core_jax.app re-exports both for the trainers.
"""

from __future__ import annotations

import argparse
import sys


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the commands that are not absl apps: a bad flag is one `error: ...` line and
    exit 2, like `fail`, instead of the whole usage."""

    def error(self, message):
        fail(message)
