"""Entry-point plumbing: `--config FILE --config.KEY=VALUE --workdir DIR`, clean errors, exit codes.

Every command that takes a config goes through `parse_config_flags`, so a bad config reads the same
everywhere: one line on stderr and exit code 2, before anything compiles.
"""

from __future__ import annotations

import sys
from typing import Callable

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from core_jax import checkpoint, distributed, flag_help, trainer

# Re-exported: core_jax.app.ArgumentParser / fail are how tools and docs have reached them.
from core_jax.cli import ArgumentParser, fail  # noqa: F401
from core_jax.cli import end_dry_run, is_dry_run
from core_jax.config import ConfigError, validate
from core_jax.config_files import config_names, config_path, resolve

# Re-exported: tools and tests load configs through core_jax.app.
from core_jax.config_files import load_config  # noqa: F401
from core_jax.errors import RunError

FLAGS = flags.FLAGS


def _flags_parser(argv, usage: str | None = None):
    flag_help.exit_if_asked(argv, usage)
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        # absl would print the whole usage text and exit 1; one line and code 2 is easier to act on.
        fail(_flag_error_line(e))
    except (AttributeError, KeyError) as e:  # a --config.KEY the config has no KEY for
        fail(_unknown_key_message(argv, e))
    # Orbax and XLA log every save and compile at INFO; the progress line is what people read.
    # (A flag default alone does not hold: absl resets the level while it starts the app.)
    if "verbosity" in FLAGS and not FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    if is_dry_run():
        if len(rest) > 1:
            fail(f"unexpected arguments: {' '.join(rest[1:])}")
        if "config" in FLAGS:
            loaded_config()
        end_dry_run(argv[0])
    return rest


def _flag_error_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    # ml_collections puts the traceback of a get_config that raised (an unknown :ARG) under this
    # line; its last line says why.
    if lines[0].endswith("Error whilst parsing config file:") and len(lines) > 1:
        return f"--config: {lines[-1]}"
    return lines[0]


def _override_keys(argv) -> list[str]:
    return [a.split("=", 1)[0][len("--config.") :] for a in argv if a.startswith("--config.")]


def _unknown_key_message(argv, e: Exception) -> str:
    # ml_collections' message is a repr holding a "Did you mean" hint on a second line.
    text = str(e).replace("\\n", "\n").replace("\\'", "'")
    parts = [line.strip(" \"'") for line in text.splitlines() if line.strip(" \"'")]
    keys = ", ".join(_override_keys(argv)) or "?"
    return f"unknown config key in overrides ({keys}): {'; '.join(parts)}"


class _ConfigNameParser(flags.ArgumentParser):
    """Wraps ml_collections' `--config` parser: hands it the file a config name or path leads to."""

    def __init__(self, file_parser: flags.ArgumentParser):
        self.file_parser = file_parser

    def parse(self, argument):
        return self.file_parser.parse(resolve(argument))

    def flag_type(self):
        return self.file_parser.flag_type()


def define_config_flags(default_config: str | None, workdir_required: bool = True):
    # `--verbosity=0` brings INFO logs back (see _flags_parser).
    if "config" not in FLAGS:
        try:
            # ml_collections loads the file and applies --config.KEY overrides right here.
            config_flags.DEFINE_config_file(
                "config",
                config_path(default_config) if default_config else None,
                "A config by name (one of: "
                + ", ".join(config_names())
                + "), or a config file; either may end in :ARG for get_config(ARG). Override "
                "keys with --config.KEY=VALUE.",
                lock_config=True,
            )
        except (AttributeError, KeyError) as e:
            fail(_unknown_key_message(sys.argv, e))
        except (flags.Error, ValueError, TypeError, OSError) as e:
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
        # The default above is already a file; what the command line gives may be a name.
        FLAGS["config"].parser = _ConfigNameParser(FLAGS["config"].parser)
    if "workdir" not in FLAGS:
        flags.DEFINE_string(
            "workdir", None, "Run directory: checkpoints, metrics, images.", required=workdir_required
        )
    distributed.define_flags()


def loaded_config():
    """FLAGS.config, or exit 2 naming the file when it could not be loaded."""
    try:
        config = FLAGS.config
        if config is None:
            fail("--config is required (a config name or file, e.g. clip_shapes or configs/clip_shapes.py)")
        config.get("batch_size")  # ml_collections reports a failed load on first access
        return config
    except OSError as e:
        detail = " ".join(l.strip() for l in str(e).splitlines()[1:] if l.strip())
        fail(f"cannot load --config: {detail or e}")


def run(main: Callable, default_config: str | None = None, workdir_required: bool = True):
    """absl's app.run with the project's flags; `--help` prints the docstring of `main`'s module
    and every flag the command takes."""
    define_config_flags(default_config, workdir_required)
    usage = sys.modules[main.__module__].__doc__
    app.run(main, flags_parser=lambda argv: _flags_parser(argv, usage))


def run_trainer(make_task: Callable, default_config: str, usage: str | None = None):
    """The main of every `python -m <pkg>.train*` entry point; `usage` is its module docstring."""
    define_config_flags(default_config)

    def main(argv):
        if len(argv) > 1:
            fail(f"unexpected arguments: {' '.join(argv[1:])}")
        distributed.maybe_initialize()

        config = loaded_config()
        workdir = FLAGS.workdir
        try:
            checkpoint.check_workdir(workdir)  # before anything is written, here or there
            validate(config, jax.device_count(), jax.process_count())
            task = make_task(config, workdir)
        except (ConfigError, FileNotFoundError) as e:
            fail(str(e))
        try:
            trainer.train(config, workdir, task)
        except ConfigError as e:  # found once the model's params exist (init_from, frozen)
            fail(str(e))
        except RunError as e:  # no intact checkpoint, a refused write, a loss that stays non-finite
            fail(str(e))

    app.run(main, flags_parser=lambda argv: _flags_parser(argv, usage))
