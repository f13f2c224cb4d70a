"""Multi-process start-up: decide whether this run spans several processes, and if so join them.

Every entry point calls `define_flags()` at import time and `maybe_initialize()` first thing in
`main`, before anything touches a device. The decision is a pure function of the flags and the
environment (`detect_cluster`), so tests drive it with fake environments:

1. `--coordinator_address/--num_processes/--process_id` (or `JAX_COORDINATOR_ADDRESS` with the two
   counts as flags or `JAX_NUM_PROCESSES`/`JAX_PROCESS_ID`): passed to JAX as given. JAX's own
   cluster detection is switched off here, because under SLURM it would otherwise pin each
   process to one GPU (`SLURM_LOCALID`) even when one process drives a whole node.
2. `CORE_JAX_DISTRIBUTED=auto` (set by launch/tpu_pod.py on every TPU worker) forces an
   argument-less `jax.distributed.initialize()`; `CORE_JAX_DISTRIBUTED=off` forbids any.
   On Cloud TPU VMs the worker list lives in the metadata server, not the environment, so this
   switch is how a pod run says "I am one of several hosts" without a network query.
3. TPU environments that do carry the topology (GKE / XPK: `TPU_WORKER_HOSTNAMES`,
   `TPU_PROCESS_ADDRESSES`; multi-slice: `MEGASCALE_*`): no arguments, JAX autodetects.
4. SLURM job steps with more than one task: one task per node -> we compute the arguments
   (all local GPUs stay visible); several tasks per node -> JAX's SLURM detection (one GPU each).
5. Open MPI (`OMPI_COMM_WORLD_SIZE` > 1), or `JAX_COORDINATOR_ADDRESS` alone: JAX autodetects.

Anything else is a single-process run and JAX is left alone.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
from absl import flags

ENV_SWITCH = "CORE_JAX_DISTRIBUTED"
_ON = ("1", "true", "on", "auto", "yes")
_OFF = ("0", "false", "off", "no", "none")

# The names of the CPU collectives option across JAX versions (newest first). Both jax 0.10 and
# 0.12 have `jax_cpu_collectives_implementation` (default already 'gloo'); older releases only had
# the boolean one.
_CPU_COLLECTIVES_OPTIONS = (
    ("jax_cpu_collectives_implementation", "gloo"),
    ("jax_cpu_enable_gloo_collectives", True),
)

_initialized_here = False


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Registers the three process flags; safe to call from several modules and several times."""
    if "coordinator_address" not in flag_values:
        flags.DEFINE_string(
            "coordinator_address",
            None,
            "host:port of process 0 for a multi-process run (GPU clusters, CPU).",
            flag_values=flag_values,
        )
    if "num_processes" not in flag_values:
        flags.DEFINE_integer(
            "num_processes", None, "Number of processes in a multi-process run.", flag_values=flag_values
        )
    if "process_id" not in flag_values:
        flags.DEFINE_integer(
            "process_id", None, "This process's index in [0, num_processes).", flag_values=flag_values
        )


def add_argparse_flags(parser) -> None:
    """The same three process flags for the commands that parse with argparse; pass the parsed
    namespace to `maybe_initialize`."""
    parser.add_argument(
        "--coordinator_address", default=None, help="host:port of process 0 for a multi-process run"
    )
    parser.add_argument("--num_processes", type=int, default=None, help="processes in a multi-process run")
    parser.add_argument(
        "--process_id", type=int, default=None, help="this process's index in [0, num_processes)"
    )


def _flag(flag_values: Any, name: str):
    """Reads a flag from absl FlagValues, a Mapping, or any object with attributes; None if unset."""
    if flag_values is None:
        return None
    if isinstance(flag_values, Mapping):
        return flag_values.get(name)
    if isinstance(flag_values, flags.FlagValues):
        if name not in flag_values or not flag_values.is_parsed():
            return None
    return getattr(flag_values, name, None)


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _host_count(addresses: str | None) -> int:
    return len([a for a in (addresses or "").split(",") if a.strip()])


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM node list: 'gpu[003-006,9],cpu1' -> 'gpu003'."""
    match = re.match(r"\s*([^,\[]+)(?:\[([^,\-\]]+))?", nodelist)
    if not match:
        raise ValueError(f"cannot read a hostname from the SLURM node list {nodelist!r}")
    prefix, first_index = match.groups()
    return prefix + (first_index or "")


def _slurm_port(env: Mapping[str, str]) -> int:
    # The same ephemeral-range rule as JAX's own SLURM detection, so both agree on the port.
    explicit = _int_env(env, "JAX_COORDINATOR_PORT")
    if explicit is not None:
        return explicit
    return int(env["SLURM_JOB_ID"]) % 2**12 + (65535 - 2**12 + 1)


def _explicit(coordinator, num_processes, process_id) -> dict | None:
    given = {
        "--coordinator_address": coordinator,
        "--num_processes": num_processes,
        "--process_id": process_id,
    }
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(
            f"a multi-process run needs --coordinator_address, --num_processes and "
            f"--process_id together; missing {', '.join(missing)}"
        )
    if num_processes < 1:
        raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id must be in [0, {num_processes}), got {process_id}")
    if ":" not in coordinator:
        raise ValueError(f"--coordinator_address must be host:port, got {coordinator!r}")
    if num_processes == 1:
        return None
    return dict(
        kind="explicit",
        num_processes=num_processes,
        process_id=process_id,
        init_kwargs=dict(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            cluster_detection_method="deactivate",
        ),
    )


def detect_cluster(env: Mapping[str, str], flag_values: Any = None) -> dict | None:
    """What kind of multi-process run this is, or None for a single-process run.

    Returns {'kind': 'explicit'|'forced'|'tpu'|'slurm'|'ompi'|'jax_env', 'init_kwargs': dict for
    jax.distributed.initialize, 'num_processes': int|None, 'process_id': int|None}.
    Raises ValueError naming the flag or variable that is inconsistent.
    """
    coordinator = _flag(flag_values, "coordinator_address")
    num_processes = _flag(flag_values, "num_processes")
    process_id = _flag(flag_values, "process_id")
    if any(v is not None for v in (coordinator, num_processes, process_id)):
        return _explicit(coordinator or env.get("JAX_COORDINATOR_ADDRESS"), num_processes, process_id)
    if env.get("JAX_COORDINATOR_ADDRESS") and "JAX_NUM_PROCESSES" in env:
        return _explicit(
            env["JAX_COORDINATOR_ADDRESS"],
            _int_env(env, "JAX_NUM_PROCESSES"),
            _int_env(env, "JAX_PROCESS_ID"),
        )

    switch = env.get(ENV_SWITCH, "").strip().lower()
    if switch in _OFF and switch:
        return None
    if switch and switch not in _ON:
        raise ValueError(f"{ENV_SWITCH}={env[ENV_SWITCH]!r}: expected one of {_ON + _OFF}")
    if switch:
        return dict(kind="forced", num_processes=None, process_id=None, init_kwargs={})

    hosts = max(
        _host_count(env.get("TPU_WORKER_HOSTNAMES")), _host_count(env.get("TPU_PROCESS_ADDRESSES")), 1
    )
    slices = _int_env(env, "MEGASCALE_NUM_SLICES") or 1
    if hosts > 1 or slices > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return dict(kind="tpu", num_processes=hosts * slices, process_id=None, init_kwargs={})

    slurm = detect_slurm(env)
    if slurm is not None:
        return slurm

    ompi_size = _int_env(env, "OMPI_COMM_WORLD_SIZE")
    if ompi_size is not None and ompi_size > 1:
        return dict(
            kind="ompi",
            num_processes=ompi_size,
            process_id=_int_env(env, "OMPI_COMM_WORLD_RANK"),
            init_kwargs={},
        )
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return dict(kind="jax_env", num_processes=None, process_id=None, init_kwargs={})
    return None


def detect_slurm(env: Mapping[str, str]) -> dict | None:
    # Only inside a job step (srun) are there several processes: the batch script itself also
    # sees SLURM_NTASKS > 1 but is one process, and initialising there would wait forever.
    needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    if not all(k in env for k in needed):
        return None
    tasks = _int_env(env, "SLURM_STEP_NUM_TASKS") or _int_env(env, "SLURM_NTASKS") or 1
    if tasks <= 1:
        return None
    nodes = _int_env(env, "SLURM_STEP_NUM_NODES") or _int_env(env, "SLURM_NNODES") or tasks
    process_id = _int_env(env, "SLURM_PROCID")
    if tasks != nodes:  # several tasks per node: JAX gives each its own GPU (SLURM_LOCALID)
        return dict(kind="slurm", num_processes=tasks, process_id=process_id, init_kwargs={})
    coordinator = f"{first_slurm_host(env['SLURM_STEP_NODELIST'])}:{_slurm_port(env)}"
    info = _explicit(coordinator, tasks, process_id)
    info["kind"] = "slurm"
    return info


def enable_cpu_collectives() -> str | None:
    """Lets CPU processes exchange data (gloo); returns the option set, None if none exists.

    Harmless on GPU/TPU, where only the CPU client reads it. A value the user chose (e.g. 'mpi')
    is kept.
    """

    for name, value in _CPU_COLLECTIVES_OPTIONS:
        try:
            current = getattr(jax.config, name)
        except AttributeError:
            continue
        if isinstance(value, str) and current not in (None, "", "none"):
            return name
        jax.config.update(name, value)
        return name
    return None


def maybe_initialize(flag_values: Any = None, env: Mapping[str, str] | None = None) -> bool:
    """Calls jax.distributed.initialize exactly when the run spans several processes.

    Call before anything touches a device. `flag_values` defaults to absl's FLAGS (ignored while
    unparsed) and `env` to os.environ. Idempotent. Returns True when JAX's distributed system is
    up after the call (whether this call or an earlier one started it).
    """
    global _initialized_here

    if _initialized_here or jax.distributed.is_initialized():
        return True
    info = detect_cluster(
        os.environ if env is None else env, flags.FLAGS if flag_values is None else flag_values
    )
    if info is None:
        return False
    enable_cpu_collectives()
    try:
        jax.distributed.initialize(**info["init_kwargs"])
    except RuntimeError as e:
        if "before" in str(e) or "backend" in str(e).lower():
            raise RuntimeError(
                "core_jax.distributed.maybe_initialize() must run before any JAX call that touches "
                f"devices (found a {info['kind']} multi-process run): {e}"
            ) from e
        raise
    _initialized_here = True
    return True


def is_main_process() -> bool:
    """True on process 0, the one that writes logs, metrics and images (all processes checkpoint)."""

    return jax.process_index() == 0
