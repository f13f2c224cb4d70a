"""Memory of the DALL-E train step from the compiled step's memory analysis, on 8 fake CPU devices.

- Train state per device for mesh.fsdp = 1, 2, 4, 8 (data = 8 / fsdp): the step's argument bytes
  minus the device's slice of the batch. FSDP works when bytes x fsdp stays within 5% of the
  unsharded total (what is left over is the replicated part: norms, biases, the step counter).
- Activation memory (the step's temporary bytes) under each remat policy: none, dots, full.

Needs 8 devices, so `run_all` starts it as a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (`run_subprocess`); the MFU runs must not see
fake devices. Only compiles: nothing is executed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from bench import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8
MODEL = {
    "model.d_model": 512,
    "model.num_heads": 8,
    "model.head_dim": 64,
    "model.mlp_dim": 2048,
    "model.num_layers": 8,
    "model.image_grid": 16,
    "model.text_len": 64,
    "text.context_length": 64,
    "model.text_vocab_size": 16384,
    "model.image_vocab_size": 8192,
    "batch_size": 16,
}
TOY_MODEL = {
    "model.d_model": 64,
    "model.num_heads": 2,
    "model.head_dim": 32,
    "model.mlp_dim": 128,
    "model.num_layers": 2,
    "model.image_grid": 4,
    "model.text_len": 8,
    "text.context_length": 8,
    "model.text_vocab_size": 256,
    "model.image_vocab_size": 128,
    "batch_size": 8,
}
PRESETS = {
    "full": dict(model=MODEL, fsdp=(1, 2, 4, 8), remat=("none", "dots", "full"), fast_compile=False),
    "quick": dict(model=MODEL, fsdp=(1, 2, 4, 8), remat=("none", "dots", "full"), fast_compile=False),
    "toy": dict(model=TOY_MODEL, fsdp=(1, 8), remat=("none", "full"), fast_compile=True),
}
TOLERANCE = 0.05


def dalle_config(overrides: dict, fsdp: int, remat: str):
    from bench.bench_mfu import apply_overrides, load_config

    config = apply_overrides(load_config("dalle_shapes"), overrides)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = DEVICES // fsdp, fsdp, 1
    config.remat = remat
    return config


def compile_step(config, fast_compile: bool = False) -> dict:
    """Compiles the real train step (dalle_jax.dalle_task, shapes only) on the config's mesh."""
    import jax
    import numpy as np
    from core_jax import sharding, trainer
    from core_jax.optim import make_optimizer
    from dalle_jax import dalle_task

    devices = jax.devices()[:DEVICES]
    task = dalle_task.make_task(config, None)  # text_vocab_size > 0: shapes only, no tokenizer
    mesh = sharding.make_mesh(config.mesh, devices)
    batch = {
        k: jax.ShapeDtypeStruct(
            s.shape, s.dtype, sharding=sharding.batch_sharding(mesh, len(s.shape), s.shape[0])
        )
        for k, s in task.batch_spec(int(config.batch_size)).items()
    }
    tx, schedule = make_optimizer(config.optim, config.total_steps)
    _, abstract, shardings = trainer.state_shardings(task, tx, mesh, config, batch)
    step = trainer.jit_train_step(
        task, tx, schedule, config, mesh, shardings, jax.tree.map(lambda x: x.sharding, batch)
    )
    t = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = common.compile_lowered(step.lower(abstract, batch), fast_compile)
    mem = common.memory_bytes(compiled)

    def per_device(x):
        shape = x.sharding.shard_shape(x.shape)
        return int(np.prod(shape)) * np.dtype(x.dtype).itemsize

    batch_bytes = sum(per_device(x) for x in batch.values())
    return {
        "mesh": dict(mesh.shape),
        "compile_seconds": time.perf_counter() - t,
        **mem,
        "batch_bytes_per_device": batch_bytes,
        "state_bytes_per_device": mem["argument"] - batch_bytes,
        "state_bytes_from_shardings": sum(per_device(x) for x in jax.tree.leaves(abstract)),
        "state_bytes_total": sum(
            int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract)
        ),
        "params": trainer.count_params(abstract.params),
    }


def run(size: str = "full") -> dict:
    import jax

    preset = PRESETS[common.check_size(size)]
    if jax.device_count() < DEVICES:
        raise RuntimeError(
            f"the memory bench needs {DEVICES} devices, found {jax.device_count()}: run it "
            f"with XLA_FLAGS={common.FAKE_DEVICES_FLAG}={DEVICES} (run_subprocess does)"
        )
    t0 = time.perf_counter()
    fsdp_rows = []
    for f in preset["fsdp"]:
        common.log(f"memory: fsdp={f}")
        fsdp_rows.append(
            dict(fsdp=f, **compile_step(dalle_config(preset["model"], f, "none"), preset["fast_compile"]))
        )
    total = next(r for r in fsdp_rows if r["fsdp"] == 1)["state_bytes_per_device"]
    for r in fsdp_rows:
        r["bytes_times_fsdp_over_total"] = r["state_bytes_per_device"] * r["fsdp"] / total
    remat_fsdp = max(preset["fsdp"])
    remat_rows = []
    for policy in preset["remat"]:
        if policy == "none":  # the fsdp row already compiled exactly this step
            same = next(r for r in fsdp_rows if r["fsdp"] == remat_fsdp)
            remat_rows.append(
                dict({k: v for k, v in same.items() if k != "fsdp"}, remat=policy, fsdp=remat_fsdp)
            )
            continue
        common.log(f"memory: remat={policy}")
        remat_rows.append(
            dict(
                remat=policy,
                fsdp=remat_fsdp,
                **compile_step(dalle_config(preset["model"], remat_fsdp, policy), preset["fast_compile"]),
            )
        )
    out = {
        "name": "memory",
        "size": size,
        "devices": DEVICES,
        "model": dict(preset["model"]),
        "unsharded_state_bytes": total,
        "fsdp": fsdp_rows,
        "remat": remat_rows,
        "seconds": time.perf_counter() - t0,
    }
    out["targets"] = targets(out)
    return out


def targets(out: dict) -> list[dict]:
    rows = []
    for r in out["fsdp"]:
        if r["fsdp"] == 1:
            continue
        excess = r["bytes_times_fsdp_over_total"] - 1
        met = abs(excess) <= TOLERANCE
        why = (
            ""
            if met
            else (
                f"{100 * excess:+.1f}%: parameters whose sharded axis does not divide by "
                f"{r['fsdp']}, or that have no 'embed' axis, stay replicated"
            )
        )
        rows.append(
            common.target(
                f"train state x fsdp={r['fsdp']} vs unsharded",
                f"{100 * excess:+.2f}%",
                f"within {TOLERANCE:.0%}",
                met,
                why=why,
            )
        )
    temps = {r["remat"]: r["temp"] for r in out["remat"]}
    order = [p for p in ("none", "dots", "full") if p in temps]
    decreasing = all(temps[a] > temps[b] for a, b in zip(order, order[1:]))
    rows.append(
        common.target(
            "remat lowers activation memory (" + " > ".join(order) + ")",
            " / ".join(common.mib(temps[p]) for p in order),
            "strictly decreasing",
            decreasing,
            why="" if decreasing else "XLA kept the rematerialised values alive",
        )
    )
    return rows


def markdown(out: dict) -> str:
    m = out["model"]
    lines = [
        f"### Memory per device from the compiled train step ({out['devices']} fake CPU devices, "
        f"{out['size']})",
        "",
        f"DALL-E transformer d_model {m['model.d_model']}, {m['model.num_layers']} layers, "
        f"mlp {m['model.mlp_dim']}, {m['model.text_len']} text + {m['model.image_grid'] ** 2} image "
        f"tokens, vocab {m['model.text_vocab_size']} + {m['model.image_vocab_size']}, global batch "
        f"{m['batch_size']}, AdamW, float32; {out['fsdp'][0]['params']:,} params. State = "
        "params + optimizer state + counters; per device = argument bytes of the compiled step "
        "minus the device's batch slice.",
        "",
    ]
    rows = [
        [
            r["fsdp"],
            f"{r['mesh']['data']}x{r['mesh']['fsdp']}x{r['mesh']['tensor']}",
            common.mib(r["state_bytes_per_device"]),
            common.mib(r["state_bytes_from_shardings"]),
            common.mib(r["state_bytes_per_device"] * r["fsdp"]),
            f"{100 * (r['bytes_times_fsdp_over_total'] - 1):+.2f}%",
            common.mib(r["temp"]),
        ]
        for r in out["fsdp"]
    ]
    lines.append(
        common.md_table(
            [
                "fsdp",
                "mesh data x fsdp x tensor",
                "state / device (compiled)",
                "state / device (shardings)",
                "x fsdp",
                "vs unsharded",
                "temp / device",
            ],
            rows,
        )
    )
    lines += [
        "",
        f"Activation (temporary) memory per device under each remat policy (fsdp={out['remat'][0]['fsdp']}):",
        "",
    ]
    base = out["remat"][0]["temp"]
    rows = [
        [r["remat"], common.mib(r["temp"]), f"{r['temp'] / base:.2f}x", common.fmt(r["compile_seconds"])]
        for r in out["remat"]
    ]
    lines.append(
        common.md_table(["remat", "temp / device", f"vs {out['remat'][0]['remat']}", "compile s"], rows)
    )
    return "\n".join(lines)


def run_subprocess(size: str = "full", timeout: float = 1200) -> dict:
    """`run(size)` in a child process that sees 8 fake CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = common.with_fake_devices(env.get("XLA_FLAGS", ""), DEVICES)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "memory.json")
        proc = subprocess.run(
            [sys.executable, "-m", "bench.bench_memory", "--size", size, "--json_out", path],
            cwd=REPO,
            env=env,
            timeout=timeout,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"bench_memory subprocess failed with code {proc.returncode}")
        with open(path) as f:
            return json.load(f)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="full", choices=common.SIZES)
    ap.add_argument("--json_out", default="")
    args = ap.parse_args()
    result = run(args.size)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f)
    print(markdown(result))
