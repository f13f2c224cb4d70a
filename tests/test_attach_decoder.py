"""attach_decoder: a DALL-E decodes with a fine-tuned decoder only when that dVAE's encoder is the
one it was trained with, bit for bit; a stale or mismatched attachment is an error, not a guess."""

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import numpy as np
import pytest

from dalle_jax import attach_decoder
from dalle_jax.pipeline import Pipeline
from tests.test_generate import CODES, SIZE, _dalle_workdir
from tests.workdirs import tiny_dvae_workdir


def _variant(src, dst, part, seed=7):
    """A copy of dVAE workdir `src` whose `part` ('encoder' or 'decoder') params are changed."""
    from core_jax.checkpoint import load_params, save_params

    config, params = load_params(src)
    rng = np.random.default_rng(seed)
    params = dict(params)
    params[part] = jax.tree.map(
        lambda v: np.asarray(v) + 0.05 * rng.standard_normal(v.shape).astype(np.float32), params[part]
    )
    save_params(dst, config, params)
    return dst


@pytest.fixture(scope="module")
def wds(tmp_path_factory):
    root = tmp_path_factory.mktemp("attach")
    joint = tiny_dvae_workdir(str(root / "dvae"), SIZE, CODES)
    out = {
        "joint": joint,
        "decoder": _variant(joint, str(root / "dvae_decoder"), "decoder"),
        "other_encoder": _variant(joint, str(root / "dvae_other"), "encoder"),
        "other_codebook": tiny_dvae_workdir(str(root / "dvae_16"), SIZE, CODES // 2),
        "dalle": str(root / "dalle"),
    }
    _dalle_workdir(out["dalle"], joint)
    return out


def _scenes(n=4):
    from core_jax.data import shapes
    from core_jax.data.image_ops import resize_and_crop

    return np.stack([resize_and_crop(shapes.make_example("test_seen", i)["image"], SIZE) for i in range(n)])


def test_attached_decoder_draws_the_same_tokens(wds):
    before = Pipeline.load(wds["dalle"], unroll_layers=False)
    record = attach_decoder.main(["--workdir", wds["dalle"], "--dvae_workdir", wds["decoder"]])
    assert record["tokens_from"] == wds["joint"] and record["dvae_workdir"] == wds["decoder"]
    after = Pipeline.load(wds["dalle"], unroll_layers=False)
    assert after.config.dvae_workdir == wds["decoder"]
    images = _scenes()
    tokens = np.asarray(before.dvae.encode(images))
    np.testing.assert_array_equal(np.asarray(after.dvae.encode(images)), tokens)
    # ... and draws them differently: the decoder is the attached one, not the joint one.
    assert not np.array_equal(np.asarray(after.dvae.decode(tokens)), np.asarray(before.dvae.decode(tokens)))
    # --dvae_workdir still overrides the attachment.
    assert Pipeline.load(wds["dalle"], dvae_workdir=wds["joint"]).config.dvae_workdir == wds["joint"]
    # config.json still records what the DALL-E was trained with.
    with open(os.path.join(wds["dalle"], "config.json")) as f:
        assert json.load(f)["dvae_workdir"] == wds["joint"]


@pytest.mark.parametrize(
    "which, match", [("other_encoder", "other encoder weights"), ("other_codebook", "vocab_size 16, not 32")]
)
def test_another_encoder_is_refused(wds, tmp_path, which, match, capsys):
    dalle = str(tmp_path / "dalle")
    _dalle_workdir(dalle, wds["joint"])
    with pytest.raises(SystemExit) as e:
        attach_decoder.main(["--workdir", dalle, "--dvae_workdir", wds[which]])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(os.path.join(dalle, attach_decoder.DECODER_FILE))


def test_missing_workdirs_are_one_line_errors(wds, tmp_path, capsys):
    for args, match in [
        (["--workdir", str(tmp_path / "nope"), "--dvae_workdir", wds["decoder"]], "--workdir not found"),
        (["--workdir", wds["dalle"], "--dvae_workdir", str(tmp_path / "nope")], "--dvae_workdir not found"),
    ]:
        with pytest.raises(SystemExit):
            attach_decoder.main(args)
        assert match in capsys.readouterr().err


def test_a_stale_attachment_is_an_error(wds, tmp_path):
    from core_jax.checkpoint import read_config, write_config

    dalle = str(tmp_path / "dalle")
    _dalle_workdir(dalle, wds["joint"])
    attach_decoder.attach(dalle, wds["decoder"])
    config = read_config(dalle)
    config.dvae_workdir = wds["other_encoder"]  # as if the DALL-E were retrained on other tokens
    write_config(dalle, config)
    with pytest.raises(ValueError, match="decoder.json attaches .* run dalle_jax.attach_decoder again"):
        Pipeline.load(dalle)
