"""The toy task as a trainer command, for tests that kill, signal or starve a real training process:

    python -m tests.fault_worker --workdir DIR [--config.KEY=VALUE ...]

It is `core_jax.app.run_trainer` on tests/toy_task.py, so errors, exit codes and signals behave as
in every trainer. FAULT_KILL_AT makes the process kill itself with SIGKILL (no cleanup, as the
kernel's OOM killer or a lost machine would):
- `save:K[:D]`: D milliseconds (default 0) after checkpoint K's save has begun (orbax's temporary
  folder, or already the step's folder, exists): inside orbax's background write while it lasts;
- `step:K`: as soon as metrics.jsonl holds step K's row (written while step K+1 runs);
- `saved:K`: as soon as checkpoint K is complete (its folder renamed into place on a local disk;
  on a bucket, where orbax writes the step's folder in place, its commit_success.txt written).
"""

import dataclasses
import os
import signal
import threading
import time

from core_jax import app, storage
from tests.toy_task import make_toy_task

KILL_ENV = "FAULT_KILL_AT"


def _reached(workdir: str, kind: str, k: int) -> bool:
    # Through core_jax.storage: the worker's workdir may be a bucket (tests/test_buckets.py).
    ckpt = storage.join(workdir, "checkpoints")
    if kind == "save":
        return any(storage.exists(storage.join(ckpt, n)) for n in (f"{k}.orbax-checkpoint-tmp", str(k)))
    if kind == "saved":
        final = [str(k), "commit_success.txt"] if storage.is_remote(workdir) else [str(k)]
        return storage.exists(storage.join(ckpt, *final))
    try:
        return f'{{"step": {k},' in storage.read_text(storage.join(workdir, "metrics.jsonl"))
    except FileNotFoundError:
        return False


def kill_when(workdir: str, spec: str) -> None:
    """Starts a thread that SIGKILLs this process once `spec` (`save:K[:D]` or `step:K`) happens."""
    kind, k, *delay = spec.split(":")
    if kind not in ("save", "saved", "step") or len(delay) > (kind == "save"):
        raise ValueError(f"{KILL_ENV}={spec!r}: expected save:K, save:K:MILLISECONDS, saved:K or step:K")

    def watch():
        while not _reached(workdir, kind, int(k)):
            # A toy checkpoint's save takes tens of milliseconds; a bucket is asked less often.
            time.sleep(0.05 if storage.is_remote(workdir) else 0.001)
        time.sleep(int(delay[0]) / 1000 if delay else 0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="fault-kill", daemon=True).start()


def make_task(config, workdir):
    if os.environ.get(KILL_ENV):
        kill_when(workdir, os.environ[KILL_ENV])
    # No FLOP count: the trainer would measure this CPU's peak first (seconds) for the MFU.
    return dataclasses.replace(make_toy_task(config, workdir), flops_per_example=None)


if __name__ == "__main__":
    app.run_trainer(make_task, "tests/toy_task.py")
