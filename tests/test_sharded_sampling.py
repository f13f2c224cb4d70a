"""Sampling and embedding with params sharded as in training (core_jax.sharded_inference) give
what one device gives, on 8 fake CPU devices and across two processes of 4 devices each."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from clip_jax import embed, eval_common
from clip_jax.api import CLIPModel
from core_jax import sharded_inference
from core_jax.checkpoint import read_config
from dalle_jax import generate
from dalle_jax.pipeline import Pipeline
from tests.workdirs import tiny_clip_workdir, tiny_dalle_workdir, tiny_dvae_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a red circle in the top left"
ROWS = 8


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    dvae = tiny_dvae_workdir(str(root / "dvae"), size=16, codes=32)
    return {
        "dvae": dvae,
        "dalle": tiny_dalle_workdir(str(root / "dalle"), dvae, grid=4, codes=32, image_size=16),
        "clip": tiny_clip_workdir(str(root / "clip")),
    }


def _sharded_leaves(params) -> list[str]:
    return [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if not leaf.sharding.is_fully_replicated
    ]


@pytest.mark.parametrize("mesh_sizes", [dict(data=1, fsdp=8, tensor=1), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_params_sample_the_tokens_of_one_device(workdirs, mesh_sizes):
    one = Pipeline.load(workdirs["dalle"])
    mesh = sharded_inference.train_mesh(read_config(workdirs["dalle"]), mesh_sizes)
    sharded = Pipeline.load(workdirs["dalle"], mesh=mesh)
    assert dict(mesh.shape) == mesh_sizes
    assert _sharded_leaves(sharded.params), "every param is replicated"
    text = one.encode_text([PROMPT, None, "a blue square"] * 3)[:ROWS]
    kwargs = dict(seed=3, batch_size=ROWS, temperature=1.0)
    np.testing.assert_array_equal(sharded.sample_rows(text, **kwargs), one.sample_rows(text, **kwargs))


def test_clip_embeddings_sharded_equal_one_device(workdirs):
    one = CLIPModel.load(workdirs["clip"])
    mesh = sharded_inference.train_mesh(read_config(workdirs["clip"]), dict(data=2, fsdp=4, tensor=1))
    sharded = CLIPModel.load(workdirs["clip"], mesh=mesh)
    assert _sharded_leaves(sharded.params)
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    texts = [PROMPT, "a blue square in the center", "two shapes"]
    # (the embed command's test runs the sharded text tower)
    np.testing.assert_allclose(sharded.embed_images(images), one.embed_images(images), rtol=1e-5, atol=1e-6)

    # clip_jax.evaluate's encoder on params loaded onto the training shardings of an fsdp mesh.
    config = read_config(workdirs["clip"])
    fsdp = sharded_inference.train_mesh(config, dict(data=1, fsdp=8, tensor=1))
    params = eval_common.load_clip_params(workdirs["clip"], config, None, fsdp)
    encoder = eval_common.ParamsEncoder(config, params, workdirs["clip"])
    assert encoder.mesh is fsdp and _sharded_leaves(params)
    got = encoder.gather(encoder.embed_images(np.concatenate([images, images[:3]])))[:5]
    np.testing.assert_allclose(got, one.embed_images(images), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(encoder.embed_texts(texts), one.embed_texts(texts), rtol=1e-5, atol=1e-6)


def test_embed_command_sharded_equals_one_device(workdirs, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text(f"{PROMPT}\na blue square\nthree shapes\n")
    common = ["--workdir", workdirs["clip"], "--texts_file", str(texts)]
    one = embed.main(common + ["--out", str(tmp_path / "one.npz"), "--mesh", "none"])
    sharded = embed.main(common + ["--out", str(tmp_path / "sharded.npz"), "--config.mesh.fsdp=4"])
    np.testing.assert_allclose(sharded["text_embeddings"], one["text_embeddings"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        np.load(tmp_path / "sharded.npz")["text_embeddings"], sharded["text_embeddings"]
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MESH_FLAGS = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]


def _generate_args(workdirs, out_dir):
    return [
        "--workdir",
        workdirs["dalle"],
        "--prompt",
        PROMPT,
        "--num_samples",
        "8",
        "--batch_size",
        "8",
        "--seed",
        "1",
        "--out_dir",
        str(out_dir),
    ] + MESH_FLAGS


def test_two_processes_sample_what_one_process_samples(workdirs, tmp_path):
    port = _free_port()
    env = dict(
        os.environ,
        PYTHONPATH=REPO,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dalle_jax.generate"]
            + _generate_args(workdirs, tmp_path / f"out{i}")
            + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(l[-2000:] for l in logs)
    assert not (tmp_path / "out1").exists(), "process 1 wrote files"

    generate.main(_generate_args(workdirs, tmp_path / "one") + ["--mesh", "train"])
    two, one = tmp_path / "out0", tmp_path / "one"
    np.testing.assert_array_equal(np.load(two / "tokens.npy"), np.load(one / "tokens.npy"))
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))
    for name in os.listdir(one):
        if name != "scores.json":  # it records the flags, --mesh among them
            assert (two / name).read_bytes() == (one / name).read_bytes(), name


def test_mesh_flags_that_cannot_fill_the_devices_fail_in_one_line(workdirs, tmp_path, capsys):
    # -1 takes the rest from the config's own -1 axis (data here), so one flag fits every model.
    config = read_config(workdirs["clip"])
    assert int(config.mesh.data) == -1
    got = sharded_inference.train_mesh(config, {"fsdp": -1})
    assert dict(got.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(SystemExit) as e:
        generate.main(_generate_args(workdirs, tmp_path / "bad")[:-3] + ["--config.mesh.fsdp=3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: config.mesh") and "fsdp" in err[0], err


def test_reconstruct_command_sharded_equals_one_device(workdirs, tmp_path):
    from PIL import Image

    from dalle_jax import reconstruct
    from dalle_jax.dvae_api import DVAE

    mesh = sharded_inference.train_mesh(read_config(workdirs["dvae"]), dict(data=2, fsdp=2, tensor=2))
    assert _sharded_leaves(DVAE.load(workdirs["dvae"], mesh=mesh).params)
    pixels = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    (tmp_path / "in").mkdir()
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / "in" / f"{i}.png")
    common = ["--workdir", workdirs["dvae"], "--input_dir", str(tmp_path / "in"), "--batch_size", "4"]
    reconstruct.main(common + ["--out_dir", str(tmp_path / "one"), "--mesh", "none"])
    reconstruct.main(common + ["--out_dir", str(tmp_path / "sharded")] + MESH_FLAGS)
    for i in range(len(pixels)):
        one, sharded = (np.asarray(Image.open(tmp_path / d / f"{i}.png")) for d in ("one", "sharded"))
        # Reconstructions are uint8: a float32 difference moves a pixel by one step at most.
        assert np.abs(one.astype(int) - sharded.astype(int)).max() <= 1


def test_process_flags_and_mesh_choices_are_checked_before_any_load(workdirs, tmp_path, capsys):
    args = _generate_args(workdirs, tmp_path / "bad")[:-3]
    for extra, said in [
        (["--num_processes=2", "--process_id=0"], "missing --coordinator_address"),
        (["--mesh", "none", "--config.mesh.fsdp=8"], "does not go with --mesh none"),
    ]:
        with pytest.raises(SystemExit) as e:
            generate.main(args + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and said in err[0], err
    assert not (tmp_path / "bad").exists()
