"""Shared pieces of the benchmark suite: the machine's description, timing, the peak FLOP/s
reference, compiled-step helpers and the shape of a target row.

Every bench module has `run(size) -> dict` (size: 'full' | 'quick' | 'toy', presets at the top of
each module) and `markdown(result) -> str`. A result dict always holds `name`, `size`, `seconds`
(wall time of the bench) and `targets` (a list of `target(...)` rows, possibly empty).
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Sequence

SIZES = ("full", "quick", "toy")
FAKE_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def check_size(size: str) -> str:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return size


# ----------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_id() -> str:
    """'family F model M stepping S' (VMs often hide the marketing name)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("cpu family", "model", "stepping") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip():
                    break
    except OSError:
        return ""
    return " ".join(f"{k.split()[-1]} {v}" for k, v in fields.items())


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info() -> dict:
    """What the figures were measured on (the table's header)."""
    import jax
    import jaxlib

    flags = cpu_flags()
    return {
        "cpu_model": cpu_model(),
        "cpu_id": cpu_id(),
        "cores": usable_cores(),
        "cpu_count": os.cpu_count(),
        "isa": ",".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def without_fake_devices(xla_flags: str) -> str:
    """XLA_FLAGS minus the fake-device flag (MFU must run on the one real CPU device)."""
    return " ".join(f for f in xla_flags.split() if not f.startswith(FAKE_DEVICES_FLAG))


def with_fake_devices(xla_flags: str, count: int = 8) -> str:
    return (without_fake_devices(xla_flags) + f" {FAKE_DEVICES_FLAG}={count}").strip()


# ----------------------------------------------------------------------------- timing


def summarize(times: Sequence[float]) -> dict:
    """best (min: noise only ever adds time), median and all samples, in seconds."""
    if not times:
        raise ValueError("no timings to summarize")
    return {
        "best": min(times),
        "median": statistics.median(times),
        "n": len(times),
        "samples": [round(t, 6) for t in times],
    }


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
    """Times `fn()` (which must block until its work is done) `repeats` times after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return summarize(times)


def block(tree):
    import jax

    return jax.block_until_ready(tree)


def peak_matmul_flops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> dict:
    """FLOP/s of an n x n x n matrix product through JAX on the default device.

    The same measurement as core_jax.metrics.measure_matmul_flops (which the trainer's `mfu` uses),
    but returning best and median so the ratio to a model step can use the same statistic.
    """
    import jax
    import jax.numpy as jnp

    key = jax.random.key(0)
    a = jax.random.normal(key, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: x @ y)
    timing = time_calls(lambda: f(a, b).block_until_ready(), repeats, warmup=1)
    flops = 2.0 * n**3
    return {
        "dtype": dtype,
        "n": n,
        "best_flops": flops / timing["best"],
        "median_flops": flops / timing["median"],
        "timing": timing,
    }


def best_peak(measurements: Sequence[dict]) -> dict:
    """Merges several peak measurements of one dtype (taken before and after the models)."""
    times = [t for m in measurements for t in m["timing"]["samples"]]
    flops = 2.0 * measurements[0]["n"] ** 3
    timing = summarize(times)
    return {
        "dtype": measurements[0]["dtype"],
        "n": measurements[0]["n"],
        "best_flops": flops / timing["best"],
        "median_flops": flops / timing["median"],
        "timing": timing,
    }


# ----------------------------------------------------------------------------- compiled steps


def cost_flops(compiled) -> float:
    """FLOPs XLA counts for a compiled computation (a while/scan body is counted once)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def memory_bytes(compiled) -> dict:
    mem = compiled.memory_analysis()
    out = {
        k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
        for k in ("argument", "output", "alias", "temp", "generated_code")
    }
    return out


def one_device_mesh():
    """A 1x1x1 mesh on the first device: the MFU figures are per device."""
    import jax
    from core_jax import sharding

    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, [jax.devices()[0]])


# Toy runs check the plumbing, not the figures: compiling without LLVM optimisation is ~2x faster.
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}


def compile_lowered(lowered, fast: bool = False):
    return lowered.compile(compiler_options=FAST_COMPILE_OPTIONS) if fast else lowered.compile()


def compiled_train_step(task, config, mesh, batch: dict, fast_compile: bool = False):
    """(compiled step, abstract state, global batch, compile seconds) for `task` on `mesh`: the
    trainer's own step (core_jax.trainer.jit_train_step) compiled ahead of time from shapes, so
    timing never includes compiling and no parameters need initialising."""
    import jax
    from core_jax import trainer
    from core_jax.optim import make_optimizer

    tx, schedule = make_optimizer(config.optim, config.total_steps)
    global_batch = trainer.make_global_batch(mesh, batch)
    _, abstract, shardings = trainer.state_shardings(task, tx, mesh, config, global_batch)
    step = trainer.jit_train_step(
        task, tx, schedule, config, mesh, shardings, jax.tree.map(lambda x: x.sharding, global_batch)
    )
    t = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = compile_lowered(step.lower(abstract, global_batch), fast_compile)
    return compiled, abstract, global_batch, time.perf_counter() - t


def random_params(abstract_params, seed: int = 0):
    """Parameter values from numpy for a tree of shapes: normal(0.02) matrices, ones for scales,
    zeros for the rest. Step timing does not depend on the values, and jit-compiling the real
    initialisers (jax.random for every kernel) takes longer than the whole timing on a small CPU."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)

    def one(path, s):
        name = jax.tree_util.keystr(path).lower()
        if len(s.shape) >= 2:
            return (0.02 * rng.standard_normal(s.shape)).astype(s.dtype)
        return (np.ones if "scale" in name else np.zeros)(s.shape, s.dtype)

    return jax.tree_util.tree_map_with_path(one, abstract_params)


def initial_state(task, config, mesh, global_batch):
    """A train state of the trainer's structure and shardings (core_jax.trainer.TrainState) with
    `random_params` values and the optimizer's own initial state. Params are float32 whatever the
    compute dtype, so one state serves every dtype's step."""
    import jax
    import jax.numpy as jnp
    from core_jax import trainer
    from core_jax.optim import make_optimizer

    tx, _ = make_optimizer(config.optim, config.total_steps)
    _, abstract, shardings = trainer.state_shardings(task, tx, mesh, config, global_batch)
    params = random_params(abstract.params)

    def build(params):
        return trainer.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            nonfinite_skipped=jnp.zeros((), jnp.int32),
        )

    with jax.set_mesh(mesh):
        return jax.jit(build, out_shardings=shardings)(params)


def copy_tree(tree):
    """A copy whose buffers a donating step may consume without touching the original."""
    import jax

    return jax.tree.map(lambda x: x.copy(), tree)


def time_train_step(compiled, state, batch, mesh, steps: int, warmup: int = 1):
    """Per-step wall times of the compiled step on a fixed batch (state donated and carried)."""
    import jax

    holder = {"state": state}

    def one():
        with jax.set_mesh(mesh):
            holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))

    return time_calls(one, steps, warmup)


# ----------------------------------------------------------------------------- targets and tables


def target(name: str, value, goal: str, met: bool | None, *, unit: str = "", why: str = "") -> dict:
    """One row of the targets table. `met=None`: not measured (e.g. a peer is not installed)."""
    return {"name": name, "value": value, "unit": unit, "goal": goal, "met": met, "why": why}


def status_text(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "n/a"}[met]


def fmt(x, digits: int = 3) -> str:
    """Short human number: 3 significant digits, thousands separators for big ones."""
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) >= 10**digits:
        return f"{x:,.0f}"
    return f"{x:.{max(digits - 1 - int(math.floor(math.log10(abs(x)))), 0)}f}"


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def gib(b) -> str:
    return "-" if b is None else f"{b / 2**30:.3f} GiB"


def mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
    return "\n".join(lines)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
