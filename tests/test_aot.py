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


def _small_dalle_config():
    from configs.dalle_shapes import get_config

    config = get_config()
    with config.unlocked():
        config.model.text_vocab_size = 64  # a fixed vocabulary: the compile needs no tokenizer
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 2, 2
    return config


def test_sampling_mode_compiles_the_decode_step_with_sharded_params():
    devices = _tpu_devices("v5e:2x2")
    config = _small_dalle_config()
    hbm = aot.CHIPS["v5e"].hbm_bytes
    r = aot.analyse_sampling(config, devices, hbm, rows=8)
    assert r["fits"] and r["rows"] == 8 and r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    # float32 params split 4 ways, plus the cache (donated: its output aliases it).
    assert 4 * r["params"] / 4 <= r["argument_bytes"] < 4 * r["params"], r
    assert r["alias_bytes"] > 0
    # The cache grows with the rows (8x here); the params do not.
    wide = aot.analyse_sampling(config, devices, hbm, rows=64)
    assert wide["argument_bytes"] > 3 * r["argument_bytes"], (wide, r)


def test_sampling_mode_cli_exit_3_when_the_cache_does_not_fit(tmp_path):
    pytest.importorskip("libtpu", reason="libtpu (the 'tpu' extra) is not installed")
    cfg = tmp_path / "cfg.py"
    cfg.write_text(
        "from tests.test_aot import _small_dalle_config\n"
        "def get_config(arg=None):\n    return _small_dalle_config()\n"
    )
    cmd = [sys.executable, "-m", "core_jax.aot", f"--config={cfg}", "--topology=v5e:2x2", "--mode=sample"]
    # A 4-layer float32 cache (80 positions, 4 heads of 64) holds 160 KiB per row and device with
    # heads split on tensor=2; 2**18 rows split on fsdp=2 are 20 GiB per chip of 16.
    r = subprocess.run(cmd + ["--sample_batch=262144"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "decode step of 262144 rows" in r.stdout and "error: the 262144-row decode step" in r.stderr
