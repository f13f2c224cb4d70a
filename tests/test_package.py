"""The package as a user installs it: a wheel built from this checkout, installed into a fresh
environment and run from a directory outside the repository, configs by name included.

The fresh environment is a venv without pip or dependencies of its own: a `.pth` file puts this
interpreter's import path (jax, flax, pip, ...), less the repository, after its own site-packages.
Plain path lines add only those folders; the `.pth` files inside them are not run, so an editable
install of the repository there (its import finder) stays out, and `dalle_jax.__file__` proves the
wheel's copy is the one imported.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("setup.py", "core_jax", "clip_jax", "dalle_jax", "configs")
# A CLIP of width 16 on 16x16 images, one block per tower: two steps, a checkpoint, one small eval.
TINY_CLIP = [
    "--config.total_steps=2",
    "--config.batch_size=8",
    "--config.model.image_size=16",
    "--config.data.image_size=16",
    "--config.model.vision_width=16",
    "--config.model.vision_layers=1",
    "--config.model.vision_heads=2",
    "--config.model.text_width=16",
    "--config.model.text_layers=1",
    "--config.model.text_heads=2",
    "--config.model.embed_dim=8",
    "--config.eval_every=2",
    "--config.checkpoint_every=2",
    "--config.eval.max_examples=8",
]


def _clean_env(**extra) -> dict:
    """This environment without PYTHONPATH (the tests put the repository on it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return dict(env, JAX_PLATFORMS="cpu", **extra)


def _run(args, cwd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)


def build_wheel(tmp) -> str:
    """The wheel of a copy of the sources (the build writes build/ and *.egg-info beside them)."""
    src, dist = os.path.join(tmp, "src"), os.path.join(tmp, "dist")
    os.makedirs(src)
    for name in SOURCES:
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(src, name), ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src)
    have_setuptools = importlib.util.find_spec("setuptools") is not None
    # With setuptools here (the test extra installs it) the build is offline; without, pip fetches it.
    isolation = ["--no-build-isolation"] if have_setuptools else []
    r = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", dist, src], tmp)
    if r.returncode and not have_setuptools and "installing build dependencies" in r.stdout + r.stderr:
        pytest.skip("building a wheel needs setuptools: not installed here and pip cannot download it")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = glob.glob(os.path.join(dist, "*.whl"))
    return wheel


def fresh_env(tmp, wheel) -> str:
    """A venv holding the installed wheel; returns its bin folder."""
    env_dir = os.path.join(tmp, "venv")
    r = _run([sys.executable, "-m", "venv", "--without-pip", env_dir], tmp)
    assert r.returncode == 0, r.stderr
    python = os.path.join(env_dir, "bin", "python")
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp)
    repo = {os.path.realpath(REPO), os.path.realpath(os.path.join(REPO, "tests"))}
    dependencies = [p for p in sys.path if p and os.path.isdir(p) and os.path.realpath(p) not in repo]
    with open(os.path.join(purelib.stdout.strip(), "_dependencies.pth"), "w") as f:
        f.write("\n".join(dependencies) + "\n")
    # --force-reinstall: pip sees this interpreter's install of the project and must not skip.
    r = _run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall", wheel], tmp
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return os.path.join(env_dir, "bin")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("package"))
    bin_dir = fresh_env(tmp, build_wheel(tmp))
    cwd = os.path.join(tmp, "elsewhere")  # no configs/ and no package folders here
    os.makedirs(cwd)
    return {"bin": bin_dir, "cwd": cwd, "site": os.path.dirname(os.path.dirname(bin_dir))}


def test_the_wheel_is_what_imports_and_every_config_form_finds_the_installed_configs(installed):
    script = """
import json, dalle_jax, clip_jax, core_jax
from core_jax.app import config_path, load_config
forms = ["clip_shapes", "configs/clip_shapes.py", "dalle_clip_jax_configs/clip_shapes.py"]
print(json.dumps({
    "packages": [m.__file__ for m in (dalle_jax, clip_jax, core_jax)],
    "paths": [config_path(f) for f in forms],
    "paper_masks": load_config("dalle_shapes:paper_masks").model.attention_pattern,
    "default_masks": load_config("dalle_shapes").model.attention_pattern,
    "colour_codes": load_config("dvae_shapes:colour_split").model.colour_codes,
    "decoder_frozen": load_config("dvae_shapes_decoder").frozen,
}))
"""
    r = _run([os.path.join(installed["bin"], "python"), "-c", script], installed["cwd"])
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(r.stdout.strip().splitlines()[-1])
    site_packages = os.path.realpath(installed["site"])
    for path in found["packages"] + found["paths"]:
        assert os.path.realpath(path).startswith(site_packages + os.sep), path
    assert len(set(found["paths"])) == 1 and "dalle_clip_jax_configs" in found["paths"][0]
    assert found["paper_masks"] != found["default_masks"]
    assert found["colour_codes"] > 0 and found["decoder_frozen"] == "encoder"


def test_console_script_help_and_an_unknown_config(installed):
    train = os.path.join(installed["bin"], "clip-jax-train")
    r = _run([train, "--help"], installed["cwd"])
    assert r.returncode == 0 and "--workdir" in r.stdout and "dvae_shapes_decoder" in r.stdout, r.stderr
    r = _run([train, "--config", "clip_shape", "--workdir", "w"], installed["cwd"])
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.startswith("error: flag --config=clip_shape: unknown config 'clip_shape'"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "clip_shapes, clip_vit_b16" in r.stderr


def test_clip_jax_train_by_config_name_writes_a_checkpoint(installed):
    workdir = os.path.join(installed["cwd"], "clip")
    train = os.path.join(installed["bin"], "clip-jax-train")
    r = _run([train, "--config", "clip_shapes", "--workdir", workdir, *TINY_CLIP], installed["cwd"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
    assert "Type handler registry" not in r.stderr, r.stderr[-3000:]
