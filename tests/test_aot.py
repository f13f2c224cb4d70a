"""Will-it-fit compiles for TPU slices on this CPU machine (needs libtpu: the `tpu` extra)."""

import subprocess
import sys

import pytest

from core_jax import aot
from tests.toy_task import toy_config


@pytest.mark.parametrize(
    "name,gen,shape",
    [
        ("v4-256", "v4", (4, 4, 8)),
        ("v4-8", "v4", (2, 2, 1)),
        ("v5litepod-16", "v5e", (4, 4)),
        ("v5p-128", "v5p", (4, 4, 4)),
        ("v6e-8", "v6e", (2, 4)),
        ("v5e:4x4", "v5e", (4, 4)),
        ("v4:4x4x8", "v4", (4, 4, 8)),
        ("v5e:2x2", "v5e", (2, 2)),
    ],
)
def test_parse_topology(name, gen, shape):
    chip, got = aot.parse_topology(name)
    assert (chip.generation, got) == (gen, shape)


@pytest.mark.parametrize("bad", ["v9-8", "v4-12", "tpu", "v5e:2x2x2"])
def test_parse_topology_rejects(bad):
    with pytest.raises(ValueError, match="topology"):
        aot.parse_topology(bad)


def _tpu_devices(name):
    pytest.importorskip("libtpu", reason="libtpu (the 'tpu' extra) is not installed")
    return aot.tpu_devices(*aot.parse_topology(name))


def test_compile_for_tpu_slice_reports_memory_and_flops():
    devices = _tpu_devices("v5e:2x2")
    assert len(devices) == 4 and "TPU" in devices[0].device_kind
    config = toy_config(**{"mesh.data": 2, "mesh.fsdp": 2})
    r = aot.analyse(config, devices, aot.CHIPS["v5e"].hbm_bytes)
    assert r["fits"] and r["devices"] == 4 and r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert 0 < r["peak_bytes"] < aot.CHIPS["v5e"].hbm_bytes and r["flops_per_step_per_device"] > 0
    # Params are float32; their bytes, split over fsdp=2, are a floor on the argument bytes.
    assert r["argument_bytes"] >= 4 * r["params"] / 2
    small = aot.analyse(config, devices, hbm_bytes=r["peak_bytes"] - 1)
    assert not small["fits"]


def test_cli_exit_codes(tmp_path):
    pytest.importorskip("libtpu", reason="libtpu (the 'tpu' extra) is not installed")
    cfg = tmp_path / "cfg.py"
    cfg.write_text(
        "from tests.toy_task import toy_config\ndef get_config(arg=None):\n    return toy_config()\n"
    )
    cmd = [sys.executable, "-m", "core_jax.aot", f"--config={cfg}", "--topology=v5e:2x2"]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "FITS" in ok.stdout and "TFLOPs per step" in ok.stdout
    bad = subprocess.run(cmd[:-1] + ["--topology=v9-8"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown TPU generation" in bad.stderr


def test_cli_exit_3_when_it_does_not_fit(tmp_path):
    pytest.importorskip("libtpu", reason="libtpu (the 'tpu' extra) is not installed")
    cfg = tmp_path / "cfg.py"
    cfg.write_text(
        "from tests.toy_task import toy_config\ndef get_config(arg=None):\n    return toy_config()\n"
    )
    # 2**22 images of 64x64x3 float32 are ~190 GiB of batch: no v5e slice of 4 chips holds that.
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "core_jax.aot",
            f"--config={cfg}",
            "--topology=v5e:2x2",
            "--config.batch_size=4194304",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 3, r.stderr[-2000:]
    assert "DOES NOT FIT" in r.stdout and "error: the train step" in r.stderr
