"""Dry-runs project commands for tests/test_recipes.py: one process imports the heavy libraries
once, then forks a child per command, which runs it under CORE_JAX_DRY_RUN=1.

    python tests/recipe_dry_run.py < commands.json > results.json

stdin: [[module, function or null, argv(, options)], ...] (function: a console script's target in
module, null: `python -m module`; options: {"dry_run": false} runs the command for real,
{"missing": [name, ...]} makes those modules fail to import); stdout: [[exit code, stderr and
stdout], ...] in the same order.
"""

import importlib
import json
import os
import runpy
import sys
import tempfile
import traceback

# Imported before forking, so each child starts with them loaded (a child costs ~0.2 s, not ~3 s).
import flax.linen  # noqa: F401
import jax  # noqa: F401
import optax  # noqa: F401
import orbax.checkpoint  # noqa: F401

import core_jax.app  # noqa: F401
from core_jax.cli import DRY_RUN_ENV


def _child(module: str, function: str | None, argv: list[str], options: dict, out_fd: int) -> None:
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    if options.get("dry_run", True):
        os.environ[DRY_RUN_ENV] = "1"
    for name in options.get("missing", ()):
        sys.modules[name] = None  # import name -> ImportError
    code = 0
    try:
        if function:
            sys.argv = [module, *argv]
            getattr(importlib.import_module(module), function)()
        else:
            sys.argv = [module, *argv]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    results = []
    for module, function, argv, *options in json.load(sys.stdin):
        with tempfile.TemporaryFile() as out:
            pid = os.fork()
            if pid == 0:
                _child(module, function, argv, options[0] if options else {}, out.fileno())
            _, status = os.waitpid(pid, 0)
            out.seek(0)
            results.append([os.waitstatus_to_exitcode(status), out.read().decode("utf-8", "replace")])
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
