"""Errors shared across the packages, in a leaf module any of them can import at load time.

Entry points print each as one `error:` line and exit with code 2.
"""

from __future__ import annotations

import errno as errno_lib
import os


class ConfigError(ValueError):
    """A config that cannot run; entry points print it as one line and exit with code 2."""


class ConversionError(ValueError):
    """A checkpoint that cannot be converted (clip_jax.convert, dalle_jax.convert_dvae)."""


class RunError(RuntimeError):
    """A run that cannot go on for a reason a person has to look at, not a bug: no intact
    checkpoint to resume from, a disk that refuses writes, a loss that stays non-finite.
    Entry points print it as one line and exit with code 2, like a ConfigError."""


def write_error(path: str, code: int | None, detail: str = "") -> RunError:
    """A RunError naming the file or folder that could not be written and the OS error number."""
    name = errno_lib.errorcode.get(code, "") if code is not None else ""
    reason = f"{os.strerror(code)} (errno {code}{' ' + name if name else ''})" if code is not None else detail
    return RunError(f"cannot write {path}: {reason}")
