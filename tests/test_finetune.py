"""Fine-tuning in the shared trainer: `init_from` another workdir's params, `frozen` param paths."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from core_jax import finetune, trainer  # noqa: E402
from core_jax.checkpoint import load_params, save_params  # noqa: E402
from core_jax.config import ConfigError  # noqa: E402
from tests.toy_task import counting_inits, make_toy_task, toy_config  # noqa: E402

MESH = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


def train(wd, log=None, inits=None, **overrides):
    config = toy_config(**MESH, **overrides)
    log_fn = log.append if log is not None else (lambda s: None)
    task = make_toy_task(config)
    trainer.train(config, wd, task if inits is None else counting_inits(task, inits), log_fn=log_fn)
    return load_params(wd)[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("ft") / "source")
    return wd, train(wd)


def test_init_from_and_frozen_paths_on_a_sharded_mesh(tmp_path, source):
    src_wd, src = source
    log, inits, fresh_inits = [], [], []
    out = train(str(tmp_path / "ft"), log, inits, init_from=src_wd, frozen="w_in,w1", total_steps=3)
    fresh = train(str(tmp_path / "fresh"), inits=fresh_inits, total_steps=3)
    assert not inits and fresh_inits  # the state is built around the loaded params: no init ran
    for name in ("w_in", "w1"):  # frozen: the source's values, bit for bit, after 3 updates
        np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(src[name]))
        assert not np.array_equal(np.asarray(out[name]), np.asarray(fresh[name]))
    for name in ("b1", "w2", "w_out"):  # trained on from the source's values
        assert not np.array_equal(np.asarray(out[name]), np.asarray(src[name]))
        assert np.abs(np.asarray(out[name]) - np.asarray(src[name])).max() < 0.5
    assert any(line == f"params initialised from {src_wd}" for line in log)
    assert any(line.startswith("frozen (w_in,w1): ") for line in log), log


def test_frozen_params_keep_no_optimizer_moments():
    params = {"encoder": {"k": np.ones((4, 3), np.float32)}, "decoder": {"k": np.ones((3, 2), np.float32)}}
    tx = finetune.freeze(optax.adamw(1e-1), ("encoder",))
    state = tx.init(params)
    sizes = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, "size") and np.ndim(x) > 0)
    assert sizes == 2 * 6  # mu and nu of the decoder only
    grads = jax.tree.map(np.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    assert not np.asarray(updates["encoder"]["k"]).any()
    assert np.asarray(updates["decoder"]["k"]).all()


def test_prefixes_parse_and_match_whole_path_components():
    config = toy_config(frozen=" encoder/ , decoder/group_1,,")
    assert finetune.frozen_prefixes(config) == ("encoder", "decoder/group_1")
    labels = finetune.param_labels(
        {
            "encoder": {"a": 0},
            "encoder_extra": {"a": 0},
            "decoder": {"group_1": {"a": 0}, "group_10": {"a": 0}},
        },
        ("encoder", "decoder/group_1"),
    )
    assert labels == {
        "encoder": {"a": "frozen"},
        "encoder_extra": {"a": "train"},
        "decoder": {"group_1": {"a": "frozen"}, "group_10": {"a": "train"}},
    }


def test_bad_frozen_and_init_from_are_config_errors(tmp_path, source):
    src_wd, src = source
    with pytest.raises(ConfigError, match="no parameter path starts with 'encoder'.*w_in"):
        train(str(tmp_path / "a"), frozen="encoder", total_steps=1)
    with pytest.raises(ConfigError, match="freezes every parameter"):
        train(str(tmp_path / "b"), frozen="w_in,w1,b1,w2,w_out", total_steps=1)
    other = {k: np.asarray(v) for k, v in src.items()}
    other["w1"] = np.zeros((32, 48), np.float32)
    save_params(str(tmp_path / "other"), toy_config(), other)
    with pytest.raises(ConfigError, match=r"'w1' has shape \(32, 48\), this model needs \(32, 64\)"):
        train(str(tmp_path / "c"), init_from=str(tmp_path / "other"), total_steps=1)
    other["w1"] = np.asarray(src["w1"])
    del other["w2"]
    save_params(str(tmp_path / "fewer"), toy_config(), other)
    with pytest.raises(ConfigError, match="has no parameter 'w2' that this model needs"):
        train(str(tmp_path / "e"), init_from=str(tmp_path / "fewer"), total_steps=1)
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        train(str(tmp_path / "d"), init_from=str(tmp_path), total_steps=1)
