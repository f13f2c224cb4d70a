"""Errors shared across the packages, in a leaf module any of them can import at load time.

Entry points print each as one `error:` line and exit with code 2.
"""


class ConfigError(ValueError):
    """A config that cannot run; entry points print it as one line and exit with code 2."""


class ConversionError(ValueError):
    """A checkpoint that cannot be converted (clip_jax.convert, dalle_jax.convert_dvae)."""
