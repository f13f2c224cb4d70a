"""Where `--config` leads: a config file of your own, or one of the shipped configs by name.

`--config` and `load_config` take, each optionally followed by `:ARG` for `get_config(ARG)`:
  - the path of a .py file that exists (relative to the working directory or, in a checkout, to
    the repository);
  - a shipped config by name, `clip_shapes` or `dalle_shapes:paper_masks`;
  - a shipped config by its path in the repository or in the installed package,
    `configs/clip_shapes.py` or `dalle_clip_jax_configs/clip_shapes.py`, from any directory.
The shipped configs are the repository's configs/ folder, which `pip install .` installs as the
package `dalle_clip_jax_configs`.
"""

from __future__ import annotations

import importlib.util
import os

from core_jax.errors import ConfigError

PACKAGE = "dalle_clip_jax_configs"
# The checkout, or site-packages when the package is installed from a wheel.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def configs_dir() -> str:
    """The shipped configs beside this core_jax: the installed package, else the checkout's folder.

    Looked up beside the code, not through the import path, so a checkout on PYTHONPATH never
    reads the configs of another installed copy."""
    for folder in (PACKAGE, "configs"):
        path = os.path.join(_ROOT, folder)
        if os.path.isdir(path):
            return path
    raise ConfigError(f"no shipped configs beside {os.path.dirname(os.path.abspath(__file__))}")


def config_names() -> list[str]:
    """The names `--config` takes for the shipped configs."""
    files = os.listdir(configs_dir())
    return sorted(f[: -len(".py")] for f in files if f.endswith(".py") and not f.startswith("_"))


def config_path(name: str) -> str:
    """The file a config NAME (no `:ARG`) names; ConfigError when there is none."""
    if os.path.isfile(name):
        return name
    folder, file = os.path.split(os.path.normpath(name))
    stem = file[: -len(".py")] if file.endswith(".py") else file
    names = config_names()
    if folder in ("", "configs", PACKAGE) and stem in names:
        return os.path.join(configs_dir(), f"{stem}.py")
    # In a checkout, a path inside it from any directory (tests/fault_worker.py's default config).
    in_checkout = os.path.join(_ROOT, name)
    if (
        configs_dir() == os.path.join(_ROOT, "configs")
        and not os.path.isabs(name)
        and os.path.isfile(in_checkout)
    ):
        return in_checkout
    if folder not in ("", "configs", PACKAGE):
        raise ConfigError(f"no config file {name}")
    raise ConfigError(f"unknown config {name!r} (no such file); the shipped configs are: {', '.join(names)}")


def resolve(spec: str) -> str:
    """`--config SPEC` as the file path[:ARG] ml_collections loads."""
    name, colon, arg = spec.partition(":")
    return config_path(name) + colon + arg


def load_config(name: str, arg=None):
    """`get_config(arg)` of a config, found as `--config` finds it (NAME[:ARG], a path...)."""
    if arg is None and ":" in name:
        name, arg = name.split(":", 1)
    path = config_path(name)
    stem = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"_config_{stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
