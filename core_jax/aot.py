"""Will it fit? Compiles the real train step for a TPU slice on this (CPU) machine.

    python -m core_jax.aot --config configs/dalle_paper.py --topology v4-256
    python -m core_jax.aot --config configs/dalle_paper.py --topology v4-64 --mode=sample --sample_batch=64

Uses the same task, mesh rules and jitted step as training, for devices described by libtpu
(the `tpu` extra) rather than present. Prints per-device memory against the chip's HBM and the
FLOPs of one step; exit code 3 when it does not fit. `--mode=sample` compiles one step of the
task's sampler instead (a DALL-E's KV-cache decode step for --sample_batch rows, params on their
training shardings as the sampling commands load them).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
import sys
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # a stale lockfile must not block a compile

import jax
from absl import flags
import flax.linen as nn
from jax.experimental import topologies

from core_jax import app, finetune, sharding, storage, trainer
from core_jax.config import ConfigError, validate
from core_jax.optim import make_optimizer

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str
    topology_prefix: str  # as libtpu names it
    chip_config: str
    hbm_bytes: int
    cores_per_chip_in_name: int  # v4-256 counts TensorCores (2 per chip); v5e/v6e count chips
    dims: int


CHIPS = {
    "v4": Chip("v4", "v4", "megacore", 32 * GIB, 2, 3),
    "v5p": Chip("v5p", "v5p", "megacore", 95 * GIB, 2, 3),
    "v5e": Chip("v5e", "v5e", "default", 16 * GIB, 1, 2),
    "v6e": Chip("v6e", "v6e", "default", 32 * GIB, 1, 2),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}


def _shape_for(chips: int, dims: int) -> tuple[int, ...]:
    """The usual slice shape for a chip count: as square/cubic as powers of two allow."""
    if chips & (chips - 1):
        raise ValueError(f"topology: {chips} chips is not a power of two")
    shape = [1] * dims
    i = 0
    # Fill from the last axis so 2D gives 2x4 for 8 chips and 3D gives 2x2x4 for 16.
    while math.prod(shape) < chips:
        shape[dims - 1 - (i % dims)] *= 2
        i += 1
    shape.sort()
    if dims == 3 and chips == 4:
        shape = [2, 2, 1]
    return tuple(shape)


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
    """'v4-256' | 'v5litepod-16' | 'v5p-128' | 'v6e-8' | 'v5e:4x4' | 'v4:4x4x8' -> (chip, shape)."""
    m = re.fullmatch(r"([a-z0-9]+?)(?:pod)?[-:](.+)", name.strip().lower())
    if not m:
        raise ValueError(f"topology: cannot parse {name!r}; use e.g. v4-256, v5litepod-16, v5e:4x4")
    gen, rest = m.group(1), m.group(2)
    gen = ALIASES.get(gen, gen)
    if gen not in CHIPS:
        raise ValueError(f"topology: unknown TPU generation {m.group(1)!r} (known: {sorted(CHIPS)})")
    chip = CHIPS[gen]
    if "x" in rest:
        shape = tuple(int(x) for x in rest.split("x"))
        if len(shape) == 2 and chip.dims == 3:
            shape = shape + (1,)
        if len(shape) != chip.dims:
            raise ValueError(f"topology: {gen} slices have {chip.dims} dimensions, got {rest}")
    else:
        count = int(rest)
        chips = count // chip.cores_per_chip_in_name
        if chips < 1 or count % chip.cores_per_chip_in_name:
            raise ValueError(f"topology: {name} does not name a whole number of {gen} chips")
        shape = _shape_for(chips, chip.dims)
    return chip, shape


def tpu_devices(chip: Chip, shape: tuple[int, ...], num_slices: int = 1):
    topo = "x".join(str(s) for s in shape)
    bounds = (min(shape[0], 2), min(shape[1], 2), 1)
    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=f"{chip.topology_prefix}:{topo}",
        chip_config_name=chip.chip_config,
        chips_per_host_bounds=bounds,
        num_slices=num_slices,
    )
    return desc.devices


def load_task_module(config):
    if not config.get("task"):
        raise ValueError(
            "config.task is empty: it must name the module with make_task (e.g. dalle_jax.dalle_task)"
        )
    return importlib.import_module(config.task)


def analyse(config, devices, hbm_bytes: int, log=None) -> dict:
    """Lowers and compiles the train step for `devices`; returns memory and FLOP figures.
    `log` (if given) gets the sharding warning, if any, before the compile starts."""

    task = load_task_module(config).make_task(config, None)
    if task.batch_spec is None:
        raise ValueError(f"{config.task}.make_task gives no batch_spec; cannot compile without data")
    mesh = sharding.make_mesh(config.mesh, devices)
    batch = {}
    for key, spec in task.batch_spec(int(config.batch_size)).items():
        sh = sharding.batch_sharding(mesh, len(spec.shape), spec.shape[0])
        batch[key] = jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sh)
    tx, schedule = make_optimizer(config.optim, config.total_steps)
    tx = finetune.freeze(tx, finetune.frozen_prefixes(config))  # no optimizer moments when frozen
    abstract_boxed = trainer.abstract_boxed_params(task, config, batch)
    _, abstract, shardings = trainer.state_shardings(task, tx, mesh, config, batch, abstract_boxed)
    step = trainer.jit_train_step(
        task, tx, schedule, config, mesh, shardings, jax.tree.map(lambda x: x.sharding, batch)
    )
    n_params = trainer.count_params(abstract.params)
    warning = sharding.undivided_warning(mesh, abstract_boxed)
    if warning and log:
        log(warning)
    head = {"devices": len(devices), "mesh": dict(mesh.shape), "params": n_params}
    result = _compile_figures(lambda: step.lower(abstract, batch).compile(), mesh, hbm_bytes)
    result = dict(head, **result, sharding_warning=warning)
    if "compile_error" not in result:
        # XLA counts the body of a scanned layer stack once, so prefer the task's analytic count.
        xla_flops = result["xla_flops_per_step_per_device"]
        result["flops_per_step_per_device"] = (
            task.flops_per_example * int(config.batch_size) / len(devices)
            if task.flops_per_example
            else xla_flops
        )
    return result


def _compile_figures(compile_fn, mesh, hbm_bytes: int) -> dict:
    """Memory per device of what `compile_fn` compiles under `mesh` (fits: its peak within
    `hbm_bytes`), or the compile error when XLA already finds it cannot fit."""
    t = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = compile_fn()
    except Exception as e:  # XLA reports a step that cannot fit as RESOURCE_EXHAUSTED at compile
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        detail = next((l.strip() for l in str(e).splitlines() if "RESOURCE_EXHAUSTED" in l), str(e))
        return {
            "fits": False,
            "hbm_bytes": hbm_bytes,
            "compile_error": detail,
            "compile_seconds": time.perf_counter() - t,
        }
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    args = int(mem.argument_size_in_bytes)
    out = int(mem.output_size_in_bytes)
    alias = int(getattr(mem, "alias_size_in_bytes", 0))
    temp = int(mem.temp_size_in_bytes)
    code = int(getattr(mem, "generated_code_size_in_bytes", 0))
    peak = args + out - alias + temp + code
    return {
        "argument_bytes": args,
        "output_bytes": out,
        "alias_bytes": alias,
        "temp_bytes": temp,
        "peak_bytes": peak,
        "hbm_bytes": hbm_bytes,
        "fits": peak <= hbm_bytes,
        "xla_flops_per_step_per_device": float(cost.get("flops", 0.0)) if cost else 0.0,
        "compile_seconds": compile_s,
    }


def analyse_sampling(config, devices, hbm_bytes: int, rows: int, log=None) -> dict:
    """Lowers and compiles one step of the task's sampler (Task.decode_step) for `rows` rows on
    `devices`, params and carried state (the KV cache) sharded as the sampling commands shard
    them; returns the memory figures `analyse` returns (FLOPs: XLA's count of the step)."""
    task = load_task_module(config).make_task(config, None)
    if task.decode_step is None:
        raise ValueError(f"{config.task} has no sampler to compile (Task.decode_step); use --mode=train")
    mesh = sharding.make_mesh(config.mesh, devices)
    step, boxed_args = task.decode_step(rows)
    shardings = sharding.tree_shardings(mesh, boxed_args)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.meta.unbox(boxed_args),
        shardings,
    )
    warning = sharding.undivided_warning(mesh, boxed_args[0])
    if warning and log:
        log(warning)
    # The carried state is updated in place, as the sampling loop updates its cache.
    jitted = jax.jit(step, donate_argnums=tuple(range(1, len(abstract))))
    head = {
        "devices": len(devices),
        "mesh": dict(mesh.shape),
        "params": trainer.count_params(abstract[0]),
        "rows": rows,
    }
    result = dict(head, **_compile_figures(lambda: jitted.lower(*abstract).compile(), mesh, hbm_bytes))
    if "compile_error" not in result:
        result["flops_per_step_per_device"] = result["xla_flops_per_step_per_device"]
    return dict(result, sharding_warning=warning)


def format_report(name: str, r: dict) -> str:
    g = lambda b: f"{b / GIB:.2f} GiB"
    step = f"decode step of {r['rows']} rows" if "rows" in r else "train step"
    if "compile_error" in r:
        return (
            f"topology {name}: {r['devices']} devices, mesh {r['mesh']}, {r['params']:,} params, {step}\n"
            f"  DOES NOT FIT: {r['compile_error']}"
        )
    return "\n".join(
        [
            f"topology {name}: {r['devices']} devices, mesh {r['mesh']}, {r['params']:,} params, {step}",
            f"  per device: arguments {g(r['argument_bytes'])}, outputs {g(r['output_bytes'])} "
            f"(aliased {g(r['alias_bytes'])}), temporaries {g(r['temp_bytes'])}",
            f"  peak {g(r['peak_bytes'])} of {g(r['hbm_bytes'])} HBM "
            f"({100 * r['peak_bytes'] / r['hbm_bytes']:.1f}%) -> {'FITS' if r['fits'] else 'DOES NOT FIT'}",
            (
                f"  {r['flops_per_step_per_device'] / 1e12:.2f} TFLOPs per step per device "
                f"(model FLOPs; XLA's cost analysis: {r['xla_flops_per_step_per_device'] / 1e12:.2f}, "
                f"a scanned layer counted once); compiled in {r['compile_seconds']:.1f}s"
                if "rows" not in r
                else f"  compiled in {r['compile_seconds']:.1f}s"
            ),
        ]
    )


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        app.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        chip, shape = parse_topology(FLAGS.topology)
    except ValueError as e:
        app.fail(str(e))
    try:
        devices = tpu_devices(chip, shape, FLAGS.num_slices)
    except Exception as e:  # libtpu missing or too old
        app.fail(
            f"cannot describe TPU {FLAGS.topology} (install the 'tpu' extra: pip install -e '.[tpu]'): {e}"
        )
    config = app.loaded_config()
    try:
        log = lambda m: print(m, flush=True)  # noqa: E731
        if FLAGS.mode == "sample":
            if FLAGS.sample_batch < 1:
                raise ValueError(f"--sample_batch must be >= 1, got {FLAGS.sample_batch}")
            sharding.mesh_shape(config.mesh, len(devices))  # a mesh that cannot fill the slice, said plainly
            result = analyse_sampling(config, devices, chip.hbm_bytes, FLAGS.sample_batch, log=log)
        else:
            validate(config, len(devices), 1)
            result = analyse(config, devices, chip.hbm_bytes, log=log)
    except (ConfigError, ValueError) as e:
        app.fail(str(e))
    result["topology"] = FLAGS.topology
    print(format_report(FLAGS.topology, result), flush=True)
    if FLAGS.json_out:
        with storage.open(FLAGS.json_out, "w") as f:
            json.dump(result, f, indent=2)
    if not result["fits"]:
        need = (
            f"needs {result['peak_bytes'] / GIB:.2f} GiB per device"
            if "peak_bytes" in result
            else "ran out of memory while compiling"
        )
        advice = (
            "raise mesh.fsdp or lower --sample_batch"
            if FLAGS.mode == "sample"
            else "raise mesh.fsdp, lower batch_size, or set remat=full"
        )
        what = f"the {FLAGS.sample_batch}-row decode step" if FLAGS.mode == "sample" else "the train step"
        print(
            f"error: {what} {need}; a {chip.generation} chip has {chip.hbm_bytes / GIB:.0f} GiB: {advice}",
            file=sys.stderr,
        )
        sys.exit(3)


def cli():
    flags.DEFINE_string(
        "topology", None, "e.g. v4-256, v5litepod-16, v5p-128, v5e:4x4, v4:4x4x8", required=True
    )
    flags.DEFINE_integer("num_slices", 1, "Number of slices (multi-slice).")
    flags.DEFINE_enum("mode", "train", ["train", "sample"], "train: the train step; sample: one decode step.")
    flags.DEFINE_integer("sample_batch", 64, "--mode=sample: rows per decode step (guidance: 2 per sample).")
    flags.DEFINE_string("json_out", "", "Also write the figures as JSON here.")
    app.run(main, workdir_required=False)


if __name__ == "__main__":
    cli()
