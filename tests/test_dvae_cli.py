"""The dVAE commands end to end on a tiny config: train, reconstruct, encode_dataset, convert."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from core_jax.checkpoint import load_params, param_shapes
from core_jax.data.shapes import make_example
from dalle_jax.dvae_api import DVAE
from tests.testfiles import run_module

TINY = [
    "--config.total_steps=2",
    "--config.batch_size=8",
    "--config.log_every=1",
    "--config.eval_every=2",
    "--config.checkpoint_every=2",
    "--config.data.shapes_train_size=64",
    "--config.model.hidden=8",
    "--config.model.vocab_size=28",
    "--config.model.width_multipliers=(1,2)",
    "--config.model.decoder_init_channels=8",
    "--config.model.eval_max_batches=1",
    "--config.optim.warmup_steps=1",
    "--config.mesh.data=2",
    "--config.mesh.fsdp=2",
    "--config.mesh.tensor=2",
]


def run(*args, check=True):
    proc = run_module(*args)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{args[0]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("dvae") / "run")
    run("dalle_jax.train_dvae", "--config", "configs/dvae_shapes.py", "--workdir", workdir, *TINY)
    return workdir


def test_train_writes_metrics_images_and_checkpoint(trained):
    rows = [json.loads(line) for line in open(os.path.join(trained, "metrics.jsonl"))]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for key in ("psnr", "mse", "codebook_perplexity", "codebook_used_fraction", "temperature", "kl_weight"):
        assert np.isfinite(train_rows[-1][key]), key
    evals = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}
    assert {
        "eval/test_unseen/psnr",
        "eval/test_unseen/dead_codes",
        "eval/test_unseen/codebook_used_fraction",
    } <= set(evals)
    assert 0 <= evals["eval/test_unseen/dead_codes"] <= 28
    grids = os.listdir(os.path.join(trained, "images"))
    assert grids and grids[0].startswith("reconstructions")
    grid = np.asarray(Image.open(os.path.join(trained, "images", grids[0])))
    assert grid.dtype == np.uint8 and grid.shape[0] > 2 * 64  # originals above reconstructions


def test_api_round_trip(trained):
    from core_jax.data.shapes import make_example
    from dalle_jax.dvae_api import DVAE

    vae = DVAE.load(trained)
    assert (vae.image_size, vae.grid_size, vae.vocab_size) == (64, 32, 28)
    images = np.stack([make_example("test_unseen", i)["image"] for i in range(2)])
    tokens = vae.encode(images)
    assert tokens.shape == (2, 32, 32) and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, vae.encode(images.astype(np.float32) / 255.0))
    out = vae.decode(tokens)
    assert out.shape == (2, 64, 64, 3) and out.dtype == np.uint8
    with pytest.raises(ValueError, match="shape"):
        vae.encode(images[:, :32])
    with pytest.raises(ValueError, match="tokens must lie"):
        vae.decode(np.full((1, 32, 32), 99))


def test_reconstruct_folder(trained, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(src / "a.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (70, 64), dtype=np.uint8)).save(src / "c.JPEG")  # grayscale
    (src / "broken.png").write_bytes(b"not a png")
    (src / "notes.txt").write_text("ignored")
    proc = run("dalle_jax.reconstruct", "--workdir", trained, "--input_dir", str(src), "--out_dir", str(out))
    assert sorted(os.listdir(out)) == ["a.png", "b.png", "c.png"]
    assert np.asarray(Image.open(out / "a.png")).shape == (64, 64, 3)
    assert "skipping broken.png" in proc.stdout and "1 skipped" in proc.stdout
    assert "mean PSNR" in proc.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run(
        "dalle_jax.reconstruct",
        "--workdir",
        trained,
        "--input_dir",
        str(empty),
        "--out_dir",
        str(out),
        check=False,
    )
    assert proc.returncode == 2 and "no PNG or JPEG" in proc.stderr


def test_encode_dataset_shards(trained, tmp_path):
    out = tmp_path / "tokens"
    run(
        "dalle_jax.encode_dataset",
        "--dvae_workdir",
        trained,
        "--config",
        "configs/dvae_shapes.py",
        "--out_dir",
        str(out),
        "--splits",
        "test_unseen",
        "--max_examples",
        "10",
        "--shard_size",
        "4",
        "--batch_size",
        "8",
    )
    index = json.load(open(out / "index.json"))
    assert index["grid_size"] == 32 and index["vocab_size"] == 28
    split = index["splits"]["test_unseen"]
    assert split["examples"] == 10 and len(split["shards"]) == 3
    shards = [np.load(out / name, allow_pickle=False) for name in split["shards"]]
    tokens = np.concatenate([s["tokens"] for s in shards])
    captions = np.concatenate([s["captions"] for s in shards])
    assert tokens.shape == (10, 32, 32) and tokens.dtype == np.int32
    assert tokens.min() >= 0 and tokens.max() < 28
    from core_jax.data.shapes import make_example

    assert captions[3] == make_example("test_unseen", 3)["caption"]
    # What the DALL-E trainer's data.source='tokens' reads back from these very files.
    from core_jax.data.token_shards import TokenShardSource

    src = TokenShardSource(str(out), "test_unseen")
    example = src.load(3, None)
    assert len(src) == 10 and example["caption"] == captions[3]
    np.testing.assert_array_equal(example["image_tokens"], tokens[3].reshape(-1))


def test_convert_cli_from_npz(tmp_path):
    from test_dvae_convert import openai_state_dicts

    enc, dec = openai_state_dicts(groups=2, blocks=1)
    np.savez(tmp_path / "enc.npz", **enc)
    np.savez(tmp_path / "dec.npz", **dec)
    workdir = tmp_path / "converted"
    proc = run(
        "dalle_jax.convert_dvae",
        "--encoder",
        str(tmp_path / "enc.npz"),
        "--decoder",
        str(tmp_path / "dec.npz"),
        "--workdir",
        str(workdir),
        "--image_size",
        "32",
    )
    assert "vocab 32" in proc.stdout
    from dalle_jax.dvae_api import DVAE

    vae = DVAE.load(str(workdir))
    assert (vae.image_size, vae.grid_size) == (32, 16)
    assert vae.decode(vae.encode(np.zeros((1, 32, 32, 3), np.uint8))).shape == (1, 32, 32, 3)
    again = run(
        "dalle_jax.convert_dvae",
        "--encoder",
        str(tmp_path / "enc.npz"),
        "--decoder",
        str(tmp_path / "dec.npz"),
        "--workdir",
        str(workdir),
        check=False,
    )
    assert again.returncode == 2 and "already holds a checkpoint" in again.stderr


def test_decoder_finetune_keeps_the_encoder_and_its_tokens(trained, tmp_path):
    """configs/dvae_shapes_decoder.py: init_from the trained dVAE, encoder frozen, decoder trained
    on argmax codes; the new workdir encodes exactly as the old one and decodes differently."""
    from core_jax.checkpoint import load_params
    from core_jax.data.shapes import make_example
    from dalle_jax.dvae_api import DVAE

    workdir = str(tmp_path / "decoder")
    proc = run(
        "dalle_jax.train_dvae",
        "--config",
        "configs/dvae_shapes_decoder.py",
        "--workdir",
        workdir,
        f"--config.init_from={trained}",
        *TINY,
    )
    assert f"params initialised from {trained}" in proc.stdout
    assert "frozen (encoder): " in proc.stdout
    _, before = load_params(trained)
    _, after = load_params(workdir)
    for a, b in zip(jax_leaves(before["encoder"]), jax_leaves(after["encoder"])):
        np.testing.assert_array_equal(a, b)
    decoders = zip(jax_leaves(before["decoder"]), jax_leaves(after["decoder"]))
    assert any(not np.array_equal(a, b) for a, b in decoders)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows[-1]["kl_weight"] == 0 and train_rows[-1]["usage_weight"] == 0
    assert "eval/test_unseen/psnr" in {k for r in rows for k in r}
    images = np.stack([make_example("test_unseen", i)["image"] for i in range(4)])
    old, new = DVAE.load(trained), DVAE.load(workdir)
    tokens = old.encode(images)
    np.testing.assert_array_equal(tokens, new.encode(images))
    assert not np.array_equal(old.decode(tokens), new.decode(tokens))


def test_decoder_finetune_needs_a_frozen_encoder_and_a_source(trained, tmp_path):
    base = [
        "dalle_jax.train_dvae",
        "--config",
        "configs/dvae_shapes_decoder.py",
        "--workdir",
        str(tmp_path / "x"),
        *TINY,
    ]
    proc = run(*base, f"--config.init_from={trained}", "--config.frozen=", check=False)
    assert proc.returncode == 2 and "set --config.frozen=encoder" in proc.stderr
    proc = run(*base, check=False)
    assert proc.returncode == 2 and "set --config.init_from=" in proc.stderr
    proc = run(*base, f"--config.init_from={tmp_path / 'missing'}", check=False)
    assert proc.returncode == 2 and "init_from" in proc.stderr
    # Found only once the model exists: still one line and exit 2, no traceback.
    proc = run(*base, f"--config.init_from={trained}", "--config.model.hidden=16", check=False)
    assert proc.returncode == 2 and "has shape" in proc.stderr and "this model needs" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x" / "config.json").exists()  # a failed run writes no config


def test_resuming_with_another_config_errors_and_keeps_the_workdir(trained, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    config_before = (workdir / "config.json").read_bytes()
    steps_before = sorted(os.listdir(workdir / "checkpoints"))
    base = [
        "dalle_jax.train_dvae",
        "--config",
        "configs/dvae_shapes.py",
        "--workdir",
        str(workdir),
        *TINY,
        "--config.total_steps=4",
    ]
    proc = run(*base, "--config.model.hidden=16", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (
        "cannot resume" in proc.stderr
        and "has shape" in proc.stderr
        and "pick a new --workdir" in proc.stderr
    )
    # Same params, another optimizer state: orbax's tree mismatch, named and one line too.
    proc = run(*base, "--config.optim.name=sgd", check=False)
    assert proc.returncode == 2 and "cannot resume" in proc.stderr and "opt_state" in proc.stderr
    assert (workdir / "config.json").read_bytes() == config_before
    assert sorted(os.listdir(workdir / "checkpoints")) == steps_before
    # What resuming reads is intact: the newest checkpoint restores (training on from it is
    # tests/test_trainer.py's and tests/test_faults.py's).
    config, params = load_params(str(workdir))
    assert config["total_steps"] == 2 and jax_leaves(params)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize(
    "module, argv, message",
    [
        ("reconstruct", ["--input_dir", "x", "--out_dir", "y"], "required: --workdir"),
        (
            "reconstruct",
            ["--workdir", "w", "--input_dir", "x", "--out_dir", "y", "--batch_size", "0"],
            "positive",
        ),
        ("reconstruct", ["--workdir", "w", "--input_dir", "x", "--out_dir", "y", "--nope"], "unrecognized"),
        ("convert_dvae", ["--encoder", "e", "--decoder", "d"], "required: --workdir"),
        (
            "convert_dvae",
            ["--encoder", "e", "--decoder", "d", "--workdir", "w", "--image_size", "x"],
            "invalid int",
        ),
    ],
)
def test_tool_flag_errors_are_one_line(module, argv, message, capsys):
    """The dVAE tools parse flags with the shared argparse parser: a bad flag is one `error:` line and
    exit 2, before any model loads."""
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"dalle_jax.{module}").main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert message in err[0]


def test_colour_codes_train_sharded_and_load(tmp_path):
    """The structure / colour experiment's product codebook (28 = 4 structure x 7 colour codes),
    trained on the 2 x 2 x 2 mesh of TINY."""
    trained = str(tmp_path / "colour")
    run(
        "dalle_jax.train_dvae",
        "--config",
        "configs/dvae_shapes.py",
        "--workdir",
        trained,
        *TINY,
        "--config.model.colour_codes=7",
    )
    saved = param_shapes(trained)
    assert saved["encoder"]["output"]["kernel"][-1] == 4  # structure logits; colour from its head
    assert saved["encoder"]["colour"]["output"]["kernel"][-1] == 7
    assert saved["decoder"]["input"]["kernel"][2] == 11  # 4 + 7 rows
    vae = DVAE.load(trained)  # the digits travel in config.json: tokens are still one index in [0, 28)
    tokens = vae.encode(np.stack([make_example("test_unseen", i)["image"] for i in range(2)]))
    assert vae.vocab_size == 28 and tokens.min() >= 0 and tokens.max() < 28
    assert vae.decode(tokens).shape == (2, 64, 64, 3)
    with open(os.path.join(trained, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "eval/test_unseen/psnr" in r]
    rows = evals[-1]["eval/test_unseen/codebook_rows_used_fraction"]  # digit rows some used code holds
    used = evals[-1]["eval/test_unseen/codebook_used_fraction"]
    assert 0 < rows <= 1 and rows >= used
