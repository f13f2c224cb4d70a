"""Preemption: a SIGTERM ends training at a step boundary that every process agrees on.

Schedulers (Cloud TPU maintenance, Kubernetes, SLURM's `--signal`) send SIGTERM some seconds
before they kill a job. The trainer asks `Preemption.reached(step)` after every step; once it
says True, every process saves a checkpoint of that same step and the run ends with exit code 0,
so starting it again resumes there.

How the processes agree:
- one process: a Python SIGTERM handler sets a flag, read at the next step boundary;
- several processes with JAX's preemption service (on by default in `jax.distributed`): JAX's own
  SIGTERM handler tells the coordinator, which picks one step for all
  (`multihost_utils.reached_preemption_sync_point`, a local check while no signal came). A signal
  to any one process stops them all, a few steps later: the agreement takes seconds.
- several processes with that service switched off (`jax_enable_preemption_service=False`): the
  Python flag, all-gathered every `check_every` steps (the trainer passes log_every): an
  all-gather is a collective of its own, too slow for every step of a small model
  (docs/results.md#fault-tolerance-the-fault-tests-and-the-cost-of-a-preemption-check-2-core-amd-epyc-under-load-2026-12-07).
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class Preemption:
    """Watches for SIGTERM from construction until `close()`."""

    def __init__(self, check_every: int = 1):
        self.check_every = max(1, int(check_every))
        self._signalled = threading.Event()
        self._installed, self._previous = False, None
        multi = jax.process_count() > 1
        self._sync_point = multi and bool(getattr(jax.config, "jax_enable_preemption_service", False))
        self._gather = multi and not self._sync_point
        # JAX's handler (sync-point mode) is installed by jax.distributed.initialize; a Python
        # handler would replace it. signal.signal only works on the main thread.
        if not self._sync_point and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True

    def _on_sigterm(self, signum, frame):
        self._signalled.set()

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step`; the same answer on every process. Call it on
        every process after every step (the sync point counts steps)."""
        if self._sync_point:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        if self._gather:
            if step % self.check_every:
                return False
            flags = multihost_utils.process_allgather(np.int32(self._signalled.is_set()))
            return bool(np.max(flags))
        return self._signalled.is_set()

    def close(self) -> None:
        if self._installed:
            # None: the handler before was not set from Python; the default is the closest.
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False
