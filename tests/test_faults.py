"""Training survives the faults pod jobs meet (docs/training.md#reliability).

On the toy task, on one device, where a resumed run must end with exactly (bit for bit) the params
of the uninterrupted `reference` run:
- damaged checkpoints (cut short, a shard deleted, garbage bytes, bytes that decode to other
  values, no commit marker, unreadable metadata) are skipped for the newest intact one, kept in
  damaged_checkpoints/; with none intact the run stops with one line; an unfinished save is never
  restored;
- SIGTERM saves the step it lands on and stops; the next start resumes there;
- a refused write (a full disk, a file size limit) stops the run with one line naming the file and
  the errno, and the checkpoints before it restore;
- N non-finite steps in a row stop the run, the last checkpoint holding finite params;
- kill -9 at seeded points, inside orbax's background save too (a subprocess each);
- token and embedding shards deleted or cut short under a running iterator are counted skips.

Everything runs in this process except what needs a kill or a signal from outside. The slow part
(all 10 kill points, the trainer command's exit codes, SIGTERM to one of two processes) is marked
`faults`: `make faults` runs it, `make test` leaves it out.
"""

import dataclasses
import errno
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from core_jax import checkpoint, trainer
from core_jax import metrics as metrics_lib
from core_jax.data import SkipExample, make_iterator
from core_jax.data.token_shards import TokenShardSource
from core_jax.errors import RunError
from tests.testfiles import write_tar
from tests.toy_task import make_toy_task, toy_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
ONE_DEVICE = jax.devices()[:1]


def fault_config(**overrides):
    base = dict(total_steps=STEPS, checkpoint_every=2, keep_checkpoints=10)
    base.update(overrides)
    return toy_config(**base)


def train(workdir, *, poison_steps=(), log_fn=None, **overrides) -> list[str]:
    """One toy training on one device; returns its log lines."""
    config = fault_config(**overrides)
    lines = []
    log = lines.append if log_fn is None else (lambda line: (lines.append(line), log_fn(line)))
    # No FLOP count: the trainer would measure this CPU's peak (seconds) for every run's MFU.
    task = dataclasses.replace(make_toy_task(config, poison_steps=poison_steps), flops_per_example=None)
    trainer.train(config, str(workdir), task, devices=ONE_DEVICE, log_fn=log)
    return lines


def skipped(log) -> list[str]:
    return [line for line in log if line.startswith("warning: skipped damaged checkpoint")]


def params(workdir, step=None) -> dict:
    _, p = checkpoint.load_params(str(workdir), step)
    return {k: np.asarray(v) for k, v in p.items()}


def assert_bit_exact(workdir, reference):
    got, want = params(workdir), params(reference)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def steps_in(workdir, folder="checkpoints") -> list[str]:
    return sorted(os.listdir(os.path.join(workdir, folder)), key=lambda n: (len(n), n))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: checkpoints 2, 4, 6, 8."""
    wd = tmp_path_factory.mktemp("reference") / "run"
    train(wd)
    assert steps_in(wd) == ["2", "4", "6", "8"]
    return str(wd)


def copy_run(reference, tmp_path, name="run") -> str:
    wd = str(tmp_path / name)
    shutil.copytree(reference, wd)
    return wd


def largest_array_file(step_dir) -> str:
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
    return max(files, key=os.path.getsize)


# ------------------------------------------------------------------ damaged checkpoints


def cut_short(step_dir):
    path = largest_array_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)


def delete_shard(step_dir):
    shutil.rmtree(os.path.join(step_dir, "state", "ocdbt.process_0"))


def garbage_bytes(step_dir):
    path = largest_array_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(np.random.default_rng(0).bytes(4096))


def other_valid_bytes(step_dir):
    # Step 6's arrays under step 8's name: every byte decodes, only the fingerprint can tell.
    shutil.rmtree(os.path.join(step_dir, "state"))
    shutil.copytree(os.path.join(os.path.dirname(step_dir), "6", "state"), os.path.join(step_dir, "state"))


def no_commit_marker(step_dir):
    os.remove(os.path.join(step_dir, checkpoint.COMMIT_MARKER))


def garbage_metadata(step_dir):
    with open(os.path.join(step_dir, "state", "_METADATA"), "wb") as f:
        f.write(b"\x00not json")


def cut_short_data_state(step_dir):
    os.truncate(os.path.join(step_dir, "data", "metadata"), 5)


DAMAGE = {
    cut_short: "not valid for value of size",
    delete_shard: "",
    garbage_bytes: "",
    other_valid_bytes: "does not match the fingerprint",
    no_commit_marker: "no commit_success.txt",
    garbage_metadata: "unreadable metadata",
    cut_short_data_state: "data/metadata is unreadable",
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=lambda f: f.__name__)
def test_damaged_newest_checkpoint_is_skipped_kept_and_the_run_ends_as_the_reference(
    reference, tmp_path, damage
):
    wd = copy_run(reference, tmp_path)
    damage(os.path.join(wd, "checkpoints", "8"))
    # keep_checkpoints=2: orbax's cleanup runs while the damaged step 8 is set aside, and the
    # run saves a new step 8.
    log = train(wd, keep_checkpoints=2)
    lines = skipped(log)
    assert len(lines) == 1 and lines[0].startswith("warning: skipped damaged checkpoint 8 ("), log
    assert DAMAGE[damage] in lines[0], lines
    assert any(line.startswith(f"resumed from {wd} at step 6") for line in log), log
    assert_bit_exact(wd, reference)
    assert steps_in(wd) == ["6", "8"]
    assert steps_in(wd, checkpoint.DAMAGED_DIR) == ["8"]  # kept as it was found
    if damage is cut_short:
        # The file cut_short cut, at the same place in the kept copy (another may now be largest).
        cut = os.path.relpath(largest_array_file(f"{reference}/checkpoints/8"), f"{reference}/checkpoints/8")
        kept = os.path.join(wd, checkpoint.DAMAGED_DIR, "8", cut)
        assert os.path.getsize(kept) == os.path.getsize(f"{reference}/checkpoints/8/{cut}") // 2


def test_two_damaged_checkpoints_resume_from_the_third(reference, tmp_path):
    wd = copy_run(reference, tmp_path)
    no_commit_marker(os.path.join(wd, "checkpoints", "8"))
    cut_short(os.path.join(wd, "checkpoints", "6"))
    log = train(wd)
    assert [line.split(" (")[0] for line in skipped(log)] == [
        "warning: skipped damaged checkpoint 8",
        "warning: skipped damaged checkpoint 6",
    ], log
    assert any(line.startswith(f"resumed from {wd} at step 4") for line in log), log
    assert_bit_exact(wd, reference)
    assert steps_in(wd, checkpoint.DAMAGED_DIR) == ["6", "8"]


def test_no_intact_checkpoint_is_one_line_naming_the_workdir_and_moves_nothing(reference, tmp_path):
    wd = copy_run(reference, tmp_path)
    for step in ("2", "4", "6", "8"):
        no_commit_marker(os.path.join(wd, "checkpoints", step))
    config_before = open(os.path.join(wd, "config.json")).read()
    with pytest.raises(RunError) as e:
        train(wd)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"no intact checkpoint to resume from in {wd}/checkpoints"), msg
    assert "step 2: no commit_success.txt" in msg
    assert steps_in(wd) == ["2", "4", "6", "8"] and not os.path.exists(
        os.path.join(wd, checkpoint.DAMAGED_DIR)
    )
    assert open(os.path.join(wd, "config.json")).read() == config_before


def test_unfinished_save_is_never_restored(reference, tmp_path):
    """A save killed before orbax committed it leaves STEP.orbax-checkpoint-tmp: not a checkpoint."""
    wd = copy_run(reference, tmp_path)
    os.rename(os.path.join(wd, "checkpoints", "8"), os.path.join(wd, "checkpoints", "8.orbax-checkpoint-tmp"))
    log = train(wd)
    assert any(line.startswith(f"resumed from {wd} at step 6") for line in log), log
    assert not skipped(log)
    assert_bit_exact(wd, reference)
    assert steps_in(wd) == ["2", "4", "6", "8"]  # the new save of step 8 replaced the unfinished one


# ------------------------------------------------------------------ preemption


def test_sigterm_saves_the_step_it_lands_on_and_the_next_start_resumes_there(reference, tmp_path):
    wd = str(tmp_path / "run")
    handler_before = signal.getsignal(signal.SIGTERM)

    def preempt_after_step_2(line):  # logged while step 3 runs: the signal lands in step 3
        if line.startswith("step 2/"):
            os.kill(os.getpid(), signal.SIGTERM)

    log = train(wd, log_fn=preempt_after_step_2)
    assert log[-1] == "preempted at step 3: saved, exiting", log
    assert steps_in(wd) == ["2", "3"]  # 3 is off the checkpoint_every=2 schedule
    assert signal.getsignal(signal.SIGTERM) is handler_before
    log = train(wd)
    assert any(line.startswith(f"resumed from {wd} at step 3") for line in log), log
    assert_bit_exact(wd, reference)


# ------------------------------------------------------------------ refused writes


def test_full_disk_on_metrics_stops_with_one_line_and_earlier_checkpoints_restore(
    reference, tmp_path, monkeypatch
):
    wd = str(tmp_path / "run")
    writes = []

    class FullDisk:
        """metrics.jsonl on a disk that fills up at its 5th row (step 5's, before step 6's save)."""

        def __init__(self, f):
            self._f = f

        def write(self, text):
            writes.append(text)
            if len(writes) >= 5:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self._f.write(text)

        def __getattr__(self, name):
            return getattr(self._f, name)

    monkeypatch.setattr(metrics_lib, "open", lambda *a, **k: FullDisk(open(*a, **k)), raising=False)
    with pytest.raises(RunError) as e:
        train(wd)
    msg = str(e.value)
    assert msg == f"cannot write {wd}/metrics.jsonl: No space left on device (errno 28 ENOSPC)", msg
    monkeypatch.undo()
    assert steps_in(wd) == ["2", "4"]
    log = train(wd)
    assert any(line.startswith(f"resumed from {wd} at step 4") for line in log), log
    assert_bit_exact(wd, reference)


@pytest.fixture
def file_size_limit():
    """setrlimit(RLIMIT_FSIZE) for this process, SIGXFSZ ignored so a write past it fails with
    EFBIG (errno 27) instead of killing the process; both restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    yield lambda limit: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, old_handler)


def test_refused_checkpoint_write_stops_with_one_line_and_earlier_checkpoints_restore(
    reference, tmp_path, file_size_limit
):
    wd = copy_run(reference, tmp_path)
    for step in ("6", "8"):
        shutil.rmtree(os.path.join(wd, "checkpoints", step))
    # Below the checkpoint's largest file (~300 KB), far above every other file the run writes.
    file_size_limit(100_000)
    with pytest.raises(RunError) as e:
        train(wd)
    file_size_limit(resource.RLIM_INFINITY)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot write {wd}/checkpoints/6.orbax-checkpoint-tmp/"), msg
    assert msg.endswith(": File too large (errno 27 EFBIG)"), msg
    assert steps_in(wd) == ["2", "4", "6.orbax-checkpoint-tmp"]
    log = train(wd)
    assert any(line.startswith(f"resumed from {wd} at step 4") for line in log), log
    assert_bit_exact(wd, reference)


# ------------------------------------------------------------------ non-finite losses


def test_consecutive_nonfinite_steps_stop_the_run_and_the_last_checkpoint_is_finite(tmp_path):
    wd = str(tmp_path / "run")
    # The loss_fn sees the step before its update: these poison steps 2 and 4, 5, 6, 7, 8.
    poison = (1, 3, 4, 5, 6, 7)
    with pytest.raises(trainer.NonFiniteLoss) as e:
        train(wd, poison_steps=poison, max_consecutive_nonfinite=3)
    msg = str(e.value)
    # Step 2 alone was skipped and the count started again: 4, 5, 6 stop the run, not 2, 4, 5.
    assert "\n" not in msg and msg.startswith(
        "3 consecutive non-finite steps, the last at step 6 (loss=nan"
    ), msg
    rows = {r["step"]: r for r in map(json.loads, open(os.path.join(wd, "metrics.jsonl")))}
    assert rows[3]["nonfinite_skipped"] == 1 and np.isfinite(rows[3]["loss"])
    assert steps_in(wd) == ["2", "4", "6"]  # stopped on reading step 6's metrics, before step 8's save
    last, before = params(wd, 6), params(wd, 4)
    for k in last:  # the skipped steps 5 and 6 left the params as step 4 had them
        assert np.isfinite(last[k]).all()
        np.testing.assert_array_equal(last[k], before[k], err_msg=k)


# ------------------------------------------------------------------ data that changes under a run


def rows_of(it, n):
    return [int(k.split("/")[-1]) for _ in range(n) for k in next(it)["key"]]


def test_token_shards_deleted_or_cut_short_mid_epoch_are_counted_skips(tmp_path):
    from tests.test_token_shards import write_shards

    data_dir = write_shards(tmp_path / "tokens", splits=("train",), n=24, shard_size=8)
    cfg = toy_config().data
    cfg.unlock()
    cfg.update(source="tokens", data_dir=data_dir, num_workers=0)
    keys = lambda raw, rng: {"key": np.asarray(raw["key"])}  # noqa: E731
    it = make_iterator(
        cfg, "train", global_batch_size=4, seed=0, example_fn=keys, process_index=0, process_count=1
    )
    unopened = TokenShardSource(data_dir, "train")
    rows_of(it, 1)
    os.truncate(os.path.join(data_dir, "train-00002.npz"), 100)  # rows 16-23
    os.remove(os.path.join(data_dir, "train-00001.npz"))  # rows 8-15
    # 24 rows: more than a whole epoch of the 16 (at most) left, so every row of the cut shard
    # is tried at least once more.
    seen = rows_of(it, 6)
    assert not [r for r in seen if r >= 16] and it.skipped["unreadable_shard"] >= 8, (seen, it.skipped)
    it.close()
    # A deleted shard reads as deleted only where it was not open yet (an open file stays
    # readable after its name is gone): a source opened before the deletion, never read since.
    with pytest.raises(SkipExample, match="unreadable_shard"):
        unopened.load(8, None)


def test_embedding_shards_cut_short_mid_epoch_are_counted_skips(tmp_path):
    data_dir = tmp_path / "emb"
    data_dir.mkdir()
    names = []
    for s in range(2):
        ids = np.arange(4 * s, 4 * s + 4)
        names.append(f"train-{s:05d}.npz")
        np.savez(
            data_dir / names[-1],
            image_embedding=np.ones((4, 8), np.float32),
            text_embedding=np.ones((4, 8), np.float32),
            text=np.zeros((4, 6), np.int32),
            captions=np.asarray([f"cap {i}" for i in ids]),
            keys=np.asarray([f"train/{i}" for i in ids]),
        )
    index = {"clip_dim": 8, "text_length": 6, "splits": {"train": {"examples": 8, "shards": names}}}
    (data_dir / "index.json").write_text(json.dumps(index))
    cfg = toy_config().data
    cfg.unlock()
    cfg.update(source="embeddings", embeddings_dir=str(data_dir), num_workers=0)
    keys = lambda raw, rng: {"key": np.asarray(raw["key"])}  # noqa: E731
    it = make_iterator(
        cfg, "train", global_batch_size=2, seed=0, example_fn=keys, process_index=0, process_count=1
    )
    rows_of(it, 1)
    # Cut short, not deleted: a shard already open stays readable after its name is gone (the
    # token-shard test above covers deletion).
    os.truncate(data_dir / names[1], 100)
    seen = rows_of(it, 6)
    assert all(r < 4 for r in seen) and it.skipped["unreadable_shard"] >= 4, (seen, it.skipped)
    it.close()


def test_webdataset_shard_deleted_mid_epoch_is_a_counted_skip(tmp_path):
    from tests.testfiles import encode_image

    for s in range(2):
        items = []
        for i in range(4 * s, 4 * s + 4):
            items += [
                (f"{i:04d}.png", encode_image(np.full((32, 32, 3), i, np.uint8))),
                (f"{i:04d}.txt", b"cap"),
            ]
        write_tar(tmp_path / f"shard-{s}.tar", items)
    cfg = toy_config().data
    cfg.unlock()
    cfg.update(source="webdataset", urls=str(tmp_path / "shard-{0..1}.tar"), shuffle_buffer=1, num_workers=0)
    ids = lambda raw, rng: {"id": np.int32(raw["image"][0, 0, 0])}  # noqa: E731
    it = make_iterator(
        cfg, "train", global_batch_size=2, seed=0, example_fn=ids, process_index=0, process_count=1
    )
    next(it)
    os.remove(tmp_path / "shard-1.tar")
    # Epoch 0 may still stream shard 1 if its file was already open; epochs 1 on cannot.
    seen = [int(i) for _ in range(8) for i in next(it)["id"]]
    assert all(i < 4 for i in seen[-8:]) and it.skipped["corrupt_shard"] >= 1, (seen, it.skipped)
    it.close()


# ------------------------------------------------------------------ kill -9 (subprocesses)


def kill_points(seed: int = 0) -> list[str]:
    """10 points (tests/fault_worker.py's FAULT_KILL_AT): each of the 4 saves killed a seeded
    0-39 ms after it began (inside orbax's background write, or just after it when that was
    quicker), and 6 seeded steps killed right after their metrics row (some while the save
    before is still in flight)."""
    rng = np.random.default_rng(seed)
    saves = [f"save:{k}:{int(d)}" for k, d in zip(range(2, STEPS + 1, 2), rng.integers(0, 40, 4))]
    steps = [f"step:{int(k)}" for k in sorted(rng.choice(range(1, STEPS), 6, replace=False))]
    return saves + steps


KILL_POINTS = kill_points()  # all under `make faults`
# Under `make test`: one kill the moment a save begins, one between saves.
QUICK_KILL_POINTS = ("save:4:0", "step:3")


# The suite's XLA flags with one device: bit-exact comparisons need the flags in-process runs have.
ONE_DEVICE_FLAGS = os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=1")


def worker(workdir, *args, env=None, wrap=(), steps=STEPS, checkpoint_every=2):
    """tests/fault_worker.py (the toy task as a trainer command) on one CPU device, started by
    the command `wrap` if given."""
    cmd = [*wrap, sys.executable, "-m", "tests.fault_worker", f"--workdir={workdir}", *args]
    cmd += [f"--config.total_steps={steps}", f"--config.checkpoint_every={checkpoint_every}"]
    full_env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    full_env["XLA_FLAGS"] = ONE_DEVICE_FLAGS
    full_env.update(env or {})
    return subprocess.Popen(
        cmd, cwd=REPO, env=full_env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def killed_then_resumed(reference, workdir, point) -> tuple[list[str], list[str]]:
    """Kills the worker at `point`, resumes here; (checkpoint folder after the kill, resume log)."""
    proc = worker(workdir, env={"FAULT_KILL_AT": point})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, out[-2000:], err[-2000:])
    after_kill = steps_in(workdir) if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
    log = train(workdir)
    assert not skipped(log), log  # a kill never leaves a damaged checkpoint
    assert_bit_exact(workdir, reference)
    return after_kill, log


@pytest.mark.parametrize("point", QUICK_KILL_POINTS)
def test_kill_9_then_resume_ends_bit_exact(reference, tmp_path, point):
    after_kill, log = killed_then_resumed(reference, str(tmp_path / "run"), point)
    if point.startswith("save"):  # killed inside the save of step 4: orbax's unfinished folder
        assert after_kill == ["2", "4.orbax-checkpoint-tmp"], after_kill
        assert any(line.startswith("resumed from") and line.endswith("at step 2") for line in log), log


@pytest.mark.faults
@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_9_at_seeded_points_then_resume_ends_bit_exact(reference, tmp_path, point):
    after_kill, log = killed_then_resumed(reference, str(tmp_path / "run"), point)
    print(point, "left", after_kill, "then", [line for line in log if line.startswith("resumed")])


# ------------------------------------------------------------------ the trainer command


def wait_for_step(workdir, proc, step: int):
    import time

    path = os.path.join(workdir, "metrics.jsonl")
    while proc.poll() is None:
        if os.path.exists(path) and f'{{"step": {step},' in open(path).read():
            return
        time.sleep(0.01)
    raise AssertionError(
        f"the worker ended (rc {proc.returncode}) before step {step}: {proc.stderr.read()[-2000:]}"
    )


@pytest.mark.faults
def test_trainer_command_exits_0_on_sigterm_and_2_with_one_line_on_a_refused_write(reference, tmp_path):
    wd = str(tmp_path / "run")
    proc = worker(wd)
    wait_for_step(wd, proc, 2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    preempted = [line for line in out.splitlines() if line.startswith("preempted at step")]
    assert preempted and preempted[0].endswith(": saved, exiting"), out
    step = int(preempted[0].split()[3].rstrip(":"))
    assert str(step) in steps_in(wd)
    train(wd)
    assert_bit_exact(wd, reference)

    wd = copy_run(reference, tmp_path, "full_disk")
    for step in ("6", "8"):
        shutil.rmtree(os.path.join(wd, "checkpoints", step))

    # 100 KiB per file, SIGXFSZ ignored (EFBIG instead of death by signal); set by a shell, as
    # preexec_fn would run Python between fork and exec of this multithreaded process.
    proc = worker(wd, wrap=["bash", "-c", 'trap "" XFSZ; ulimit -f 100; exec "$@"', "limit"])
    out, err = proc.communicate(timeout=300)
    # Above the one line, tensorstore may print "Event loop is closed" tracebacks of the writes
    # that were still in flight when orbax gave the save up; none comes from this project's code.
    assert proc.returncode == 2 and "core_jax/" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {wd}/checkpoints/6.orbax-checkpoint-tmp/"), err[-2000:]
    assert last.endswith("File too large (errno 27 EFBIG)"), err[-2000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.faults
@pytest.mark.parametrize("service", ["sync_point", "allgather"])
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path, service):
    """JAX's preemption sync point (or, with that service off, the all-gathered flag) makes both
    processes save the same step and exit 0 though only process 1 got the signal; the two-process
    run then resumes from it and ends like an uninterrupted one-process run on two devices."""
    # JAX's sync point takes a few seconds to agree on a step here: a run long enough for it.
    steps, every = 30, 10
    wd = str(tmp_path / "run")
    env = {"XLA_FLAGS": ONE_DEVICE_FLAGS}
    if service == "allgather":
        env["JAX_ENABLE_PREEMPTION_SERVICE"] = "false"

    def start():
        port = free_port()
        flags = [f"--coordinator_address=localhost:{port}", "--num_processes=2"]
        return [
            worker(wd, *flags, f"--process_id={i}", env=env, steps=steps, checkpoint_every=every)
            for i in range(2)
        ]

    procs = start()
    wait_for_step(wd, procs[0], 2)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    preempted = [line for line in outs[0][0].splitlines() if line.startswith("preempted at step")]
    assert preempted, (outs[0][0], outs[1][1][-3000:])
    step = int(preempted[0].split()[3].rstrip(":"))
    assert step < steps and step % every, preempted  # off the schedule: the preemption's own save
    # The save is collective: each process's data position in it is that of the same step.
    data = json.loads(open(os.path.join(wd, "checkpoints", str(step), "data", "metadata")).read())
    assert [p["batches"] for p in data["processes"]] == [step, step], data
    procs = start()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    assert f"resumed from {wd} at step {step}" in outs[0][0]

    one = str(tmp_path / "one")
    config = fault_config(total_steps=steps, checkpoint_every=every)
    trainer.train(config, one, make_toy_task(config), devices=jax.devices()[:2], log_fn=lambda s: None)
    got, want = params(wd), params(one)
    for k in want:  # two processes all-reduce in another order than one: float32 noise only
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)
