"""Entry-point plumbing: `--config FILE --config.KEY=VALUE --workdir DIR`, clean errors, exit codes.

Every command that takes a config goes through `parse_config_flags`, so a bad config reads the same
everywhere: one line on stderr and exit code 2, before anything compiles.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from core_jax import distributed, trainer

# Re-exported: core_jax.app.ArgumentParser / fail are how tools and docs have reached them.
from core_jax.cli import ArgumentParser, fail  # noqa: F401
from core_jax.config import ConfigError, validate
from core_jax.errors import RunError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS


def config_path(name: str) -> str:
    """configs/NAME resolved against the working directory first, then the repository."""
    return name if os.path.exists(name) else os.path.join(REPO_ROOT, name)


def load_config(name: str, arg=None):
    """`get_config(arg)` of a config file, loaded as `--config` loads it: NAME is configs/NAME.py
    or a path to a .py file (resolved like config_path)."""

    path = config_path(name if name.endswith(".py") else os.path.join("configs", f"{name}.py"))
    stem = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"_config_{stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _flags_parser(argv):
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        # absl would print the whole usage text and exit 1; one line and code 2 is easier to act on.
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except (AttributeError, KeyError) as e:  # a --config.KEY the config has no KEY for
        fail(_unknown_key_message(argv, e))
    # Orbax and XLA log every save and compile at INFO; the progress line is what people read.
    # (A flag default alone does not hold: absl resets the level while it starts the app.)
    if "verbosity" in FLAGS and not FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    return rest


def _override_keys(argv) -> list[str]:
    return [a.split("=", 1)[0][len("--config.") :] for a in argv if a.startswith("--config.")]


def _unknown_key_message(argv, e: Exception) -> str:
    # ml_collections' message is a repr holding a "Did you mean" hint on a second line.
    text = str(e).replace("\\n", "\n").replace("\\'", "'")
    parts = [line.strip(" \"'") for line in text.splitlines() if line.strip(" \"'")]
    keys = ", ".join(_override_keys(argv)) or "?"
    return f"unknown config key in overrides ({keys}): {'; '.join(parts)}"


def define_config_flags(default_config: str | None, workdir_required: bool = True):
    # `--verbosity=0` brings INFO logs back (see _flags_parser).
    if "config" not in FLAGS:
        try:
            # ml_collections loads the file and applies --config.KEY overrides right here.
            config_flags.DEFINE_config_file(
                "config",
                config_path(default_config) if default_config else None,
                "Config file (configs/*.py[:arg]); override keys with --config.KEY=VALUE.",
                lock_config=True,
            )
        except (AttributeError, KeyError) as e:
            fail(_unknown_key_message(sys.argv, e))
        except (flags.Error, ValueError, TypeError, OSError) as e:
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
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
            fail("--config is required (a config file, configs/*.py[:arg])")
        config.get("batch_size")  # ml_collections reports a failed load on first access
        return config
    except OSError as e:
        detail = " ".join(l.strip() for l in str(e).splitlines()[1:] if l.strip())
        fail(f"cannot load --config: {detail or e}")


def run(main: Callable, default_config: str | None = None, workdir_required: bool = True):
    define_config_flags(default_config, workdir_required)
    app.run(main, flags_parser=_flags_parser)


def run_trainer(make_task: Callable, default_config: str):
    """The main of every `python -m <pkg>.train*` entry point."""
    define_config_flags(default_config)

    def main(argv):
        if len(argv) > 1:
            fail(f"unexpected arguments: {' '.join(argv[1:])}")
        distributed.maybe_initialize()

        config = loaded_config()
        workdir = FLAGS.workdir
        try:
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

    app.run(main, flags_parser=_flags_parser)
