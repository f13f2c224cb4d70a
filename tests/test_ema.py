"""EMA of the weights in the shared trainer: the update rule, checkpoints, resume, sharding, loading."""

import jax
import numpy as np
import pytest

from core_jax import checkpoint, data as data_lib, sharding, trainer
from core_jax.config import ConfigError, validate
from core_jax.optim import make_optimizer
from tests.toy_task import make_toy_task, toy_config

STATE_KEYS = {"step", "params", "opt_state", "nonfinite_skipped"}


def _np(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(tree))]


def _reference_ema(param_seq, decays, finite):
    """ema_0 = params_0; ema_{t+1} = d_t ema_t + (1 - d_t) params_{t+1}, unchanged on skipped steps."""
    ema = param_seq[0]
    for t, (params, ok) in enumerate(zip(param_seq[1:], finite)):
        if ok:
            ema = [decays[t] * e + (1 - decays[t]) * p for e, p in zip(ema, params)]
    return ema


def _decays(decay, warmup, steps):
    return [min(decay, (1 + t) / (10 + t)) if warmup else decay for t in range(steps)]


@pytest.mark.parametrize("decay,warmup", [(0.9, False), (0.3, True)])
def test_ema_matches_numpy_reference_over_10_steps(decay, warmup):
    # decay 0.3 with warm-up: the first three updates use (1+t)/(10+t) < 0.3, the rest 0.3.
    config = toy_config(ema_decay=decay, ema_warmup=warmup, total_steps=10)
    task = make_toy_task(config, poison_step=4)  # step 4 is skipped: the EMA must not move
    mesh = sharding.make_mesh(config.mesh, None)
    tx, schedule = make_optimizer(config.optim, config.total_steps)
    it = data_lib.make_iterator(
        config.data,
        config.data.split,
        global_batch_size=config.batch_size,
        seed=config.seed,
        example_fn=task.example_fn,
        train=True,
    )
    batch = trainer.next_global_batch(it, task, mesh)
    state, shardings = trainer.create_state(task, tx, mesh, config, batch)
    assert isinstance(state, trainer.EMATrainState)
    step = trainer.jit_train_step(
        task, tx, schedule, config, mesh, shardings, jax.tree.map(lambda x: x.sharding, batch)
    )
    seq, finite = [_np(state.params)], []
    np.testing.assert_array_equal(
        np.concatenate([x.ravel() for x in _np(state.ema)]), np.concatenate([x.ravel() for x in seq[0]])
    )
    for _ in range(10):
        with jax.set_mesh(mesh):
            state, metrics = step(state, batch)
        seq.append(_np(state.params))
        finite.append(not int(metrics["nonfinite"]))
        batch = trainer.next_global_batch(it, task, mesh)
    it.close()
    assert finite.count(False) == 1 and not finite[4], finite
    want = _reference_ema(seq, _decays(decay, warmup, 10), finite)
    got = _np(state.ema)
    for g, w, p in zip(got, want, seq[-1]):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
        assert not np.allclose(g, p, rtol=1e-3)  # the EMA really lags the params
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.ema))
    for e, p in zip(jax.tree.leaves(state.ema), jax.tree.leaves(state.params)):
        assert e.sharding == p.sharding


def _run(wd, stop_at_step=None, **overrides):
    config = toy_config(**overrides)
    logs = []
    trainer.train(config, wd, make_toy_task(config), log_fn=logs.append, stop_at_step=stop_at_step)
    return logs


def _state_keys(wd, step):
    with checkpoint._params_reader(wd) as manager:
        return checkpoint._state_keys(manager, step)


def _init_params(config):
    task = make_toy_task(config)
    mesh = sharding.make_mesh(config.mesh, None)
    tx, _ = make_optimizer(config.optim, config.total_steps)
    it = data_lib.make_iterator(
        config.data,
        config.data.split,
        global_batch_size=config.batch_size,
        seed=config.seed,
        example_fn=task.example_fn,
        train=True,
    )
    batch = trainer.next_global_batch(it, task, mesh)
    it.close()
    return _np(trainer.create_state(task, tx, mesh, config, batch)[0].params)


def test_checkpointed_ema_is_what_load_params_returns(tmp_path):
    """Every step's checkpoint: the default load is the EMA of the raw params saved so far."""
    kw = dict(ema_decay=0.8, checkpoint_every=1, keep_checkpoints=10)
    wd = str(tmp_path / "ema")
    _run(wd, **kw)
    assert _state_keys(wd, 6) == STATE_KEYS | {"ema"}
    seq = [_init_params(toy_config(**kw))]
    seq += [_np(checkpoint.load_params(wd, s, ema=False)[1]) for s in range(1, 7)]
    for s in range(1, 7):
        want = _reference_ema(seq[: s + 1], _decays(0.8, False, s), [True] * s)
        for g, w in zip(_np(checkpoint.load_params(wd, s)[1]), want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    assert checkpoint.workdir_has_ema(wd)


def test_resume_with_ema_is_exact(tmp_path):
    full = str(tmp_path / "full")
    _run(full, ema_decay=0.9)
    crash = str(tmp_path / "crash")
    _run(crash, stop_at_step=3, ema_decay=0.9)
    assert checkpoint.latest_step(crash) == 3
    _run(crash, ema_decay=0.9)
    for ema in (True, False):
        a = _np(checkpoint.load_params(full, ema=ema)[1])
        b = _np(checkpoint.load_params(crash, ema=ema)[1])
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_ema_off_keeps_todays_state_and_checkpoints(tmp_path):
    wd = str(tmp_path / "plain")
    logs = _run(wd, stop_at_step=3)
    assert _state_keys(wd, 3) == STATE_KEYS
    assert not checkpoint.workdir_has_ema(wd)
    # Without an EMA the default load and the raw load are the same params.
    for x, y in zip(_np(checkpoint.load_params(wd)[1]), _np(checkpoint.load_params(wd, ema=False)[1])):
        np.testing.assert_array_equal(x, y)
    # Turning the EMA on when resuming starts it from the restored params.
    logs = _run(wd, ema_decay=0.5, checkpoint_every=1, keep_checkpoints=10)
    assert any("has no EMA: it starts from these params" in line for line in logs), logs
    assert _state_keys(wd, 6) == STATE_KEYS | {"ema"}
    seq = [_np(checkpoint.load_params(wd, s, ema=False)[1]) for s in range(3, 7)]
    want = _reference_ema(seq, _decays(0.5, False, 3), [True] * 3)
    for g, w in zip(_np(checkpoint.load_params(wd)[1]), want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_resume_without_ema_from_an_ema_checkpoint_is_one_line_error(tmp_path):
    wd = str(tmp_path / "ema")
    _run(wd, stop_at_step=3, ema_decay=0.9)
    with pytest.raises(ConfigError) as e:
        _run(wd)
    msg = str(e.value)
    assert "\n" not in msg and "holds an EMA" in msg and "config.ema_decay=0" in msg, msg


def test_fsdp8_state_bytes_per_device_include_the_sharded_ema():
    config = toy_config(ema_decay=0.999, **{"mesh.data": 1, "mesh.fsdp": 8})
    task = make_toy_task(config)
    mesh = sharding.make_mesh(config.mesh, None)
    tx, _ = make_optimizer(config.optim, config.total_steps)
    it = data_lib.make_iterator(
        config.data,
        config.data.split,
        global_batch_size=config.batch_size,
        seed=config.seed,
        example_fn=task.example_fn,
        train=True,
    )
    batch = trainer.next_global_batch(it, task, mesh)
    it.close()
    state, _ = trainer.create_state(task, tx, mesh, config, batch)
    dev0 = jax.devices()[0]
    per_device = sum(
        s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards if s.device == dev0
    )
    total = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    want = (2 * total(state.params) + total(state.opt_state)) / 8
    assert per_device == pytest.approx(want, rel=0.05), (per_device, want)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_ema_decay_out_of_range_is_config_error(bad):
    with pytest.raises(ConfigError, match=r"config.ema_decay must be in \[0, 1\)"):
        validate(toy_config(ema_decay=bad), 8)


def test_init_from_prefers_ema_unless_raw(tmp_path):
    src = str(tmp_path / "src")
    _run(src, ema_decay=0.9)
    for raw, line in (
        (False, f"params initialised from {src} (its EMA weights)"),
        (True, f"params initialised from {src}"),
    ):
        wd = str(tmp_path / f"ft{raw}")
        logs = _run(
            wd,
            stop_at_step=1,
            init_from=src,
            init_from_raw_weights=raw,
            ema_decay=0.9,
            checkpoint_every=1,
            **{"optim.learning_rate": 0.0},
        )
        assert line in logs, logs
        got = _np(checkpoint.load_params(wd, ema=False)[1])
        for x, y in zip(got, _np(checkpoint.load_params(src, ema=not raw)[1])):
            np.testing.assert_array_equal(x, y)
        # The new run's EMA starts at its initial params (a zero learning rate keeps them there).
        for x, y in zip(_np(checkpoint.load_params(wd)[1]), got):
            np.testing.assert_allclose(x, y, rtol=1e-6)


def _ema_dvae_workdir(tmp_path):
    """A tiny dVAE workdir whose checkpoint holds params and a different EMA, as a run with
    ema_decay > 0 writes them."""
    import orbax.checkpoint as ocp
    from tests.workdirs import tiny_dvae_workdir

    wd = tiny_dvae_workdir(str(tmp_path / "dvae"))
    _, params = checkpoint.load_params(wd)
    params = jax.tree.map(np.asarray, params)
    ema = jax.tree.map(lambda p: np.float32(0.5) * p, params)
    with ocp.CheckpointManager(checkpoint.checkpoint_dir(wd)) as manager:
        manager.save(
            1,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params, "ema": ema}), data=ocp.args.JsonSave({})
            ),
            force=True,
        )
        manager.wait_until_finished()
    return wd, params, ema


def test_dvae_api_and_cli_load_ema_by_default_and_raw_on_request(tmp_path):
    from PIL import Image
    from dalle_jax.dvae_api import DVAE
    from tests.test_dvae_cli import run

    wd, params, ema = _ema_dvae_workdir(tmp_path)
    for loaded, want in ((DVAE.load(wd).params, ema), (DVAE.load(wd, raw_weights=True).params, params)):
        for x, y in zip(_np(loaded), _np(want)):
            np.testing.assert_array_equal(x, y)
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8)).save(src / "a.png")
    psnr = {}
    for flag in ([], ["--raw_weights"]):
        out = tmp_path / f"out{len(flag)}"
        proc = run(
            "dalle_jax.reconstruct", "--workdir", wd, "--input_dir", str(src), "--out_dir", str(out), *flag
        )
        psnr[bool(flag)] = next(line for line in proc.stdout.splitlines() if "mean PSNR" in line)
    assert psnr[False] != psnr[True], psnr  # different weights, different reconstructions
