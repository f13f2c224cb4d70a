"""What `--config` and `load_config` accept: a file, a shipped config by name (with :ARG), or by its
path in the repository or the installed package, from any working directory; anything else is one
`error:` line naming the shipped configs."""

import os
import subprocess
import sys

import pytest

from core_jax import config_files
from core_jax.config_files import config_names, config_path, load_config, resolve
from core_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "configs", "clip_shapes.py")


@pytest.mark.parametrize(
    "spec",
    ["clip_shapes", "clip_shapes.py", "configs/clip_shapes.py", "dalle_clip_jax_configs/clip_shapes.py"],
)
def test_names_and_shipped_paths_lead_to_the_shipped_file_from_any_directory(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.path.samefile(config_path(spec), SHIPPED)
    assert resolve(f"{spec}:some_arg") == f"{config_path(spec)}:some_arg"


def test_a_file_of_ones_own_comes_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("configs")
    with open("configs/clip_shapes.py", "w") as f:
        f.write("def get_config(arg=None):\n    return {'mine': arg}\n")
    assert config_path("configs/clip_shapes.py") == "configs/clip_shapes.py"
    assert load_config("configs/clip_shapes.py:x") == {"mine": "x"}
    assert os.path.samefile(config_path("clip_shapes"), SHIPPED)  # a name is always the shipped one


def test_in_a_checkout_its_files_are_found_from_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.path.samefile(config_path("tests/toy_task.py"), os.path.join(REPO, "tests", "toy_task.py"))


def test_presets_and_configs_that_load_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    masks = load_config("dalle_shapes:paper_masks")
    assert masks.model.to_dict() == load_config("dalle_shapes", "paper_masks").model.to_dict()
    assert masks.model.attention_pattern != load_config("dalle_shapes").model.attention_pattern
    split = load_config("dvae_shapes:colour_split").model
    assert split.colour_codes > 0 and load_config("dvae_shapes").model.colour_codes != split.colour_codes
    decoder = load_config("dvae_shapes_decoder")  # loads dvae_shapes itself
    assert (
        decoder.frozen == "encoder"
        and decoder.model.vocab_size == load_config("dvae_shapes").model.vocab_size
    )


def test_unknown_names_and_missing_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in ("clip_shape", "configs/clip_shape.py"):
        with pytest.raises(ConfigError) as e:
            config_path(spec)
        assert f"unknown config {spec!r}" in str(e.value) and ", ".join(config_names()) in str(e.value)
    with pytest.raises(ConfigError, match="no config file elsewhere/clip_shapes.py"):
        config_path("elsewhere/clip_shapes.py")
    names = config_names()
    assert "clip_shapes" in names and "dvae_shapes_decoder" in names
    assert not any(n.startswith("_") for n in names)


def test_the_installed_package_beside_the_code_comes_before_a_configs_folder(tmp_path, monkeypatch):
    # site-packages may hold some other project's `configs`; the wheel's folder is the one to use.
    for folder in ("configs", "dalle_clip_jax_configs"):
        os.makedirs(tmp_path / folder)
        (tmp_path / folder / "only_here.py").write_text(f"def get_config(arg=None):\n    return '{folder}'\n")
    monkeypatch.setattr(config_files, "_ROOT", str(tmp_path))
    assert config_names() == ["only_here"]
    assert load_config("only_here") == "dalle_clip_jax_configs"


def test_the_command_line_takes_names_and_presets_and_names_the_configs_when_unknown(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    run = lambda spec: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "dalle_jax.train", "--config", spec, "--workdir", str(tmp_path / "w")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    unknown, preset = run("dalle_shape"), run("dalle_shapes:no_such_preset")
    for r in (unknown, preset):
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert unknown.stderr.startswith("error: flag --config=dalle_shape: unknown config 'dalle_shape'")
    assert "dalle_shapes, dvae_openai" in unknown.stderr
    assert preset.stderr.strip() == (
        "error: --config: ValueError: configs/dalle_shapes.py: unknown preset 'no_such_preset' (use 'paper_masks')"
    )
    assert not os.path.exists(tmp_path / "w")
