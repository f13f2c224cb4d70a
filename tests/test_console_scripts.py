"""Every `python -m` entry point is a console script (setup.py's CONSOLE_SCRIPTS) named by one
scheme, each exits 0 when it succeeds, and each `--help` exits 0 and lists the command's flags.

The help runs in-process, as the console script calls its target (a subprocess per command would
spend seconds importing JAX each time); the absl commands parse process-wide flags, so each starts
from the flags this file found and drops the ones it defined.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys

import pytest
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("core_jax", "clip_jax", "dalle_jax")


def console_scripts() -> dict[str, str]:
    """setup.py's CONSOLE_SCRIPTS {command: module:function}, read without running setup.py."""
    with open(os.path.join(REPO, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets] == [
            "CONSOLE_SCRIPTS"
        ]:
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no CONSOLE_SCRIPTS")


SCRIPTS = console_scripts()

# Flags each command's help must list: its own, and --config / --workdir where it takes them.
TRAINER = ("--config", "--workdir", "clip_shapes")  # the help names the shipped configs
LISTED = {
    "core-jax-aot": ("--topology", "--config"),
    "core-jax-train-bpe": ("--vocab_size", "--captions_file"),
    "clip-jax-train": TRAINER,
    "clip-jax-evaluate": ("--workdir", "--out"),
    "clip-jax-classify": ("--classnames_file", "--input_dir"),
    "clip-jax-embed": ("--texts_file", "--input_dir"),
    "clip-jax-convert": ("--source", "--checkpoint"),
    "dalle-jax-train-dvae": TRAINER,
    "dalle-jax-reconstruct": ("--input_dir", "--out_dir"),
    "dalle-jax-encode-dataset": ("--dvae_workdir", "--config"),
    "dalle-jax-convert-dvae": ("--encoder", "--decoder"),
    "dalle-jax-attach-decoder": ("--dvae_workdir", "--workdir"),
    "dalle-jax-train": TRAINER,
    "dalle-jax-generate": ("--prompt", "--top_k_rerank"),
    "dalle-jax-evaluate-fidelity": ("--model", "--split"),
    "dalle-jax-contact-sheet": ("--samples_dir", "--out"),
    "unclip-encode-embeddings": ("--clip_workdir", "--config"),
    "unclip-train-prior": TRAINER,
    "unclip-train-decoder": TRAINER,
    "unclip-train-upsampler": TRAINER,
    "unclip-generate": ("--prior_workdir", "--decoder_workdir"),
    "unclip-vary": ("--decoder_workdir", "--input_dir"),
}


def _module_file(module: str) -> str:
    return os.path.join(REPO, *module.split(".")) + ".py"


def _python_m_modules() -> set[str]:
    out = set()
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(REPO, pkg)):
            for f in files:
                path = os.path.join(folder, f)
                if f.endswith(".py") and 'if __name__ == "__main__":' in open(path).read():
                    out.add(os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, "."))
    return out


def test_every_python_m_entry_point_is_a_console_script_named_by_the_scheme():
    assert {target.split(":")[0] for target in SCRIPTS.values()} == _python_m_modules()
    assert set(LISTED) == set(SCRIPTS)
    for name, target in SCRIPTS.items():
        parts = target.split(":")[0].split(".")
        prefix = "unclip" if parts[:2] == ["dalle_jax", "unclip"] else parts[0]
        assert name == f"{prefix}-{parts[-1]}".replace("_", "-"), (name, target)


def _returns(fn: ast.FunctionDef):
    """The values its own return statements give (not those of functions defined inside it)."""
    todo = list(fn.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Return) and node.value is not None:
            yield node.value
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            todo.extend(ast.iter_child_nodes(node))


def test_every_console_script_exits_0_when_it_succeeds():
    # The console script is `sys.exit(target())`: a target returning a dict would exit 1.
    for name, target in SCRIPTS.items():
        module, function = target.split(":")
        with open(_module_file(module)) as f:
            tree = ast.parse(f.read())
        fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
        assert len(fn.args.args) == len(fn.args.defaults), f"{name}: {target} needs arguments"
        for value in _returns(fn):
            assert isinstance(value, ast.Constant) and isinstance(value.value, int), (
                name,
                ast.unparse(value),
            )


_BASE_FLAGS: set | None = None


def _drop_command_flags():
    for name in list(flags.FLAGS):
        if name not in _BASE_FLAGS or name in ("config", "workdir") or name.startswith("config."):
            delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_exits_0_and_lists_the_flags(name, monkeypatch, capsys):
    global _BASE_FLAGS
    module, function = SCRIPTS[name].split(":")
    target = getattr(importlib.import_module(module), function)
    if _BASE_FLAGS is None:
        _BASE_FLAGS = set(flags.FLAGS)
    _drop_command_flags()
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    try:
        with pytest.raises(SystemExit) as e:
            target()
    finally:
        _drop_command_flags()
    out = capsys.readouterr().out
    assert e.value.code == 0, out[-2000:]
    missing = [flag for flag in LISTED[name] if flag not in out]
    assert not missing, f"{name} --help lacks {missing}:\n{out}"


def test_python_m_help_lists_the_flags_of_its_own_module_and_no_orbax_warning():
    # Run as `python -m`, absl keys the command's own flags by its file path, not its module name.
    r = subprocess.run(
        [sys.executable, "-m", "dalle_jax.encode_dataset", "--help"],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(f in r.stdout for f in ("--dvae_workdir", "--shard_size", "--config", "--coordinator_address"))
    # core_jax.checkpoint overrides orbax's jax.Array handler when imported, which orbax logs.
    assert "Type handler registry" not in r.stderr, r.stderr
