"""How every command fails: one `error: ...` line on stderr and exit code 2.

A leaf (argparse, os and sys only), so a tool that only needs these loads neither JAX nor the
trainer before parsing its flags; core_jax.app re-exports both for the trainers.

Dry run: with CORE_JAX_DRY_RUN=1 in the environment, every command parses its flags, loads its
config and applies the `--config.KEY=VALUE` overrides, then exits 0 before it touches a device, a
workdir or data (a bad flag or an unknown key still exits 2). It checks command lines, such as the
recipes in launch/README.md, on a machine that has neither the data nor the accelerators.
"""

from __future__ import annotations

import argparse
import os
import sys

DRY_RUN_ENV = "CORE_JAX_DRY_RUN"


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def is_dry_run() -> bool:
    return os.environ.get(DRY_RUN_ENV, "") not in ("", "0")


def end_dry_run(command: str) -> None:
    """Exits 0 here under CORE_JAX_DRY_RUN=1: `command`'s flags and config have parsed."""
    if is_dry_run():
        print(f"dry run: {command}: flags and config parse", file=sys.stderr, flush=True)
        sys.exit(0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the commands that are not absl apps: a bad flag is one `error: ...` line and
    exit 2, like `fail`, instead of the whole usage. Under a dry run `parse_args` is where the
    command stops (commands that take `--config.*` overrides through `parse_known_args` stop
    themselves once those are applied)."""

    def error(self, message):
        fail(message)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        end_dry_run(self.prog)
        return parsed
