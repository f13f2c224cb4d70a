"""Every config error named in the foundation issue: one clear line on stderr, exit code 2."""

import os
import subprocess
import sys

import pytest

from core_jax.config import ConfigError, validate
from tests.toy_task import toy_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "overrides,devices,message",
    [
        ({"batch_size": 12, "mesh.data": 8}, 8, "not divisible by the data-parallel size"),
        ({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1}, 8, "data*fsdp*tensor = 4"),
        ({"mesh.data": -1, "mesh.fsdp": 3}, 8, "not divisible by 3"),
        ({"mesh.data": -1, "mesh.fsdp": -1}, 8, "at most one axis may be -1"),
        ({"data.index_file": "/no/such/index.csv"}, 8, "path does not exist: /no/such/index.csv"),
        ({"batch_size": 16, "grad_accum_steps": 4, "mesh.data": 8}, 8, "micro-batch"),
        ({"nan_policy": "ignore"}, 8, "nan_policy"),
        ({"total_steps": 0}, 8, "total_steps must be positive"),
    ],
)
def test_validate_messages(overrides, devices, message):
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        validate(toy_config(**overrides), devices)


def _run(*args, module="clip_jax.train"):
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # XLA_FLAGS: tests/conftest.py's
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config.no_such_key=3"], "no_such_key"),
        (["--config.batch_size=12", "--config.mesh.data=8"], "not divisible by the data-parallel size"),
        (["--config.mesh.data=3"], "data*fsdp*tensor"),
        (["--config.data.index_file=/missing/index.csv"], "/missing/index.csv"),
        (["--config=configs/no_such_config.py"], "no_such_config.py"),
        # The shapes config on other data would train its BPE on the shapes captions: refused.
        (["--config.data.source=tfds"], "text.train_source"),
    ],
)
def test_cli_config_errors_exit_2(tmp_path, args, message):
    r = _run("--workdir", str(tmp_path / "wd"), *args)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    err_lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(err_lines) == 1 and message in err_lines[0], r.stderr[-3000:]
    assert not os.path.exists(tmp_path / "wd" / "checkpoints")  # failed before anything ran


def test_dalle_cli_config_error_exits_2(tmp_path):
    """The DALL-E config is checked in one place (dalle_jax.run_config.resolve_run), before any
    tokenizer is trained or dVAE loaded."""
    r = _run(
        "--workdir", str(tmp_path / "wd"), "--config.model.caption_dropout=1.5", module="dalle_jax.train"
    )
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    err_lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
    assert err_lines == ["error: config.model.caption_dropout must be in [0, 1), got 1.5"], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and not os.path.exists(tmp_path / "wd")


def test_dvae_cli_model_config_error_exits_2(tmp_path):
    """A dVAE model key that cannot build a network is a config error found when the task is
    made: one line, before anything is written to the workdir."""
    r = _run(
        "--workdir",
        str(tmp_path / "wd"),
        "--config.batch_size=8",
        "--config.model.hidden=6",
        module="dalle_jax.train_dvae",
    )
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    err_lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
    assert err_lines == ["error: model.hidden * width multiplier must be divisible by 4, got 6 * 1"], (
        r.stderr[-3000:]
    )
    assert "Traceback" not in r.stderr and not os.path.exists(tmp_path / "wd" / "checkpoints")
