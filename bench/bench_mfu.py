"""MFU of the dVAE, DALL-E and CLIP train steps on one device, and where a trainer step's time goes.

For each model (a mid-size config on the shapes data):
- pure step: the trainer's own jitted update step (core_jax.trainer.jit_train_step), compiled
  ahead of time, run in a loop on one fixed batch, for each compute dtype. Model FLOPs are the
  task's analytic count (matmuls 2*m*n*k forward, x3 for forward + backward) times the batch,
  cross-checked against XLA's cost_analysis() of the same step compiled with unrolled layers
  (XLA counts a scanned layer body once). MFU = model FLOP/s over the peak FLOP/s of a large matrix
  product of the step's compute dtype, measured in this run (before and after the models).
- trainer loop: core_jax.trainer.train for a few dozen steps on the shapes data, read back from
  metrics.jsonl (examples_per_sec, data_wait_fraction, mfu). Step time = compute (the pure step) +
  data wait + the rest (host dispatch, metric fetches and logging, CPU taken by data threads).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time

from bench import common
from core_jax.app import load_config


# Mid-size configs: about a second per float32 step on 2 idle cores. Dotted keys override the
# shapes config files (configs/<model>_shapes.py).
MODELS = {
    "dvae": {"model.hidden": 32, "model.blocks_per_group": 2, "batch_size": 32},
    "dalle": {
        "model.d_model": 512,
        "model.num_heads": 8,
        "model.head_dim": 64,
        "model.mlp_dim": 2048,
        "model.num_layers": 6,
        "batch_size": 16,
    },
    "clip": {
        "model.vision_width": 256,
        "model.vision_layers": 6,
        "model.vision_heads": 4,
        "model.text_width": 256,
        "model.text_layers": 6,
        "model.text_heads": 4,
        "model.embed_dim": 256,
        "batch_size": 64,
    },
}
TOY_MODELS = {
    "dvae": {
        "model.hidden": 8,
        "model.vocab_size": 56,
        "model.decoder_init_channels": 16,
        "model.width_multipliers": (1, 1),
        "data.image_size": 16,
        "batch_size": 4,
    },
    "dalle": {
        "model.d_model": 32,
        "model.num_heads": 2,
        "model.head_dim": 16,
        "model.mlp_dim": 64,
        "model.num_layers": 2,
        "model.image_vocab_size": 56,
        "batch_size": 4,
    },
    "clip": {
        "model.vision_width": 32,
        "model.vision_layers": 1,
        "model.vision_heads": 2,
        "model.text_width": 32,
        "model.text_layers": 1,
        "model.text_heads": 2,
        "model.embed_dim": 16,
        "model.image_size": 16,
        "data.image_size": 16,
        "batch_size": 4,
    },
}
PRESETS = {
    "full": dict(
        models=MODELS,
        dtypes=("float32", "bfloat16"),
        pure_steps=4,
        trainer_steps=24,
        log_every=8,
        trainer_dtype="float32",
        peak_n=2048,
        peak_repeats=5,
        fast_compile=False,
    ),
    "quick": dict(
        models=MODELS,
        dtypes=("float32", "bfloat16"),
        pure_steps=3,
        trainer_steps=16,
        log_every=4,
        trainer_dtype="float32",
        peak_n=2048,
        peak_repeats=3,
        fast_compile=False,
    ),
    "toy": dict(
        models=TOY_MODELS,
        dtypes=("float32",),
        pure_steps=2,
        trainer_steps=3,
        log_every=1,
        trainer_dtype="float32",
        peak_n=128,
        peak_repeats=2,
        fast_compile=True,
    ),
}
TRANSFORMERS = ("dalle", "clip")  # the >= 50% MFU target is for these
MFU_TARGET = 0.5
DATA_WAIT_TARGET = 0.05


def apply_overrides(config, overrides: dict):
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"config has no key {dotted!r}")
        node[leaf] = value
    return config


def model_config(model: str, overrides: dict):
    config = load_config({"dvae": "dvae_shapes", "dalle": "dalle_shapes", "clip": "clip_shapes"}[model])
    config = apply_overrides(config, overrides)
    if model == "dvae":
        config.model.eval_max_batches = 1
    if model == "clip":
        config.eval.evaluators = ""
    return config


# ----------------------------------------------------------------------------- tasks


def random_dvae_workdir(workdir: str, image_size: int, vocab_size: int) -> str:
    """A dVAE workdir (configs/dvae_shapes.py, random weights) written like a converted one, so
    DALL-E's make_task loads it through config.dvae_workdir exactly as in a real run: the host-side
    tokenisation costs what it costs there (weights do not change the cost)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from core_jax import checkpoint
    from dalle_jax import dvae_models

    config = load_config("dvae_shapes")
    config.model.vocab_size = vocab_size
    config.data.image_size = image_size
    model = dvae_models.make_dvae(config.model)
    images = jnp.zeros((1, image_size, image_size, 3))
    abstract = jax.eval_shape(lambda r: nn.meta.unbox(model.init(r, images)["params"]), jax.random.key(0))
    path = os.path.join(workdir, "dvae")
    if not os.path.exists(os.path.join(path, "config.json")):
        checkpoint.save_params(path, config, common.random_params(abstract))
    return path


def dalle_task(config, workdir: str):
    """dalle_jax.dalle_task.make_task with config.dvae_workdir = a random-weight dVAE workdir (a
    benchmark cannot assume a trained one)."""
    from dalle_jax import dalle_task as dt

    config.dvae_workdir = random_dvae_workdir(
        workdir, int(config.data.image_size), int(config.model.image_vocab_size)
    )
    return dt.make_task(config, workdir)


def make_task(model: str, config, workdir: str):
    if model == "dvae":
        from dalle_jax import dvae_task

        task = dvae_task.make_task(config, workdir)
    elif model == "dalle":
        task = dalle_task(config, workdir)
    elif model == "clip":
        from clip_jax import task as clip_task

        task = clip_task.make_task(config, workdir)
    else:
        raise ValueError(f"unknown model {model!r}; choose from {tuple(MODELS)}")
    # Evaluations and sample images are not part of a train step.
    return dataclasses.replace(task, evaluators=(), image_fn=None)


def host_batch_seconds(config, task, batches: int) -> dict:
    """Seconds to make one batch on the host (iterator + the task's batch_fn) with nothing else
    running: what the trainer would wait per step if nothing overlapped it."""
    from core_jax import data as data_lib

    it = data_lib.make_iterator(
        config.data,
        config.data.split,
        global_batch_size=config.batch_size,
        seed=config.seed + 1,
        example_fn=task.example_fn,
        train=True,
    )
    batch_fn = getattr(task, "batch_fn", None)

    def one():
        local = next(it)
        if batch_fn is not None:
            common.block(batch_fn(local))

    try:
        return common.time_calls(one, batches, warmup=1)
    finally:
        it.close()


def first_batch(config, task) -> dict:
    from core_jax import data as data_lib

    it = data_lib.make_iterator(
        config.data,
        config.data.split,
        global_batch_size=config.batch_size,
        seed=config.seed,
        example_fn=task.example_fn,
        train=True,
    )
    try:
        local = next(it)
    finally:
        it.close()
    batch_fn = getattr(task, "batch_fn", None)  # host-side per-batch work (DALL-E tokenisation)
    return batch_fn(local) if batch_fn is not None else local


# ----------------------------------------------------------------------------- measurements


def pure_step(
    model: str,
    config,
    workdir: str,
    dtype: str,
    batch: dict,
    steps: int,
    state0=None,
    fast_compile: bool = False,
) -> tuple[dict, object]:
    """Times the compiled step of `dtype`; returns (result, the initial state for reuse)."""
    config.compute_dtype = dtype
    task = make_task(model, config, workdir)
    mesh = common.one_device_mesh()
    compiled, _, gbatch, compile_s = common.compiled_train_step(task, config, mesh, batch, fast_compile)
    if state0 is None:
        state0 = common.initial_state(task, config, mesh, gbatch)
    timing = common.time_train_step(compiled, common.copy_tree(state0), gbatch, mesh, steps)
    flops = float(task.flops_per_example) * int(config.batch_size)
    return {
        "dtype": dtype,
        "timing": timing,
        "compile_seconds": compile_s,
        "analytic_flops_per_step": flops,
        "xla_flops_scanned": common.cost_flops(compiled),
    }, state0


def xla_flops_unrolled(model: str, config, workdir: str, batch: dict, fast_compile: bool = False) -> float:
    """XLA's FLOPs of the float32 step with every layer unrolled (scan bodies count once)."""
    config.compute_dtype = "float32"
    scan = bool(config.scan_layers)
    config.scan_layers = False
    try:
        task = make_task(model, config, workdir)
        compiled, *_ = common.compiled_train_step(task, config, common.one_device_mesh(), batch, fast_compile)
        return common.cost_flops(compiled)
    finally:
        config.scan_layers = scan


def trainer_run(model: str, config, workdir: str, steps: int, log_every: int, dtype: str) -> dict:
    """core_jax.trainer.train for `steps` steps; the first logged window (it holds the compile)
    is dropped."""
    import jax
    from core_jax import trainer

    config.compute_dtype = dtype
    config.total_steps, config.log_every = steps, log_every
    config.checkpoint_every, config.eval_every = steps, 10 * steps
    task = make_task(model, config, workdir)
    run_dir = os.path.join(workdir, "run")
    lines: list[str] = []
    t = time.perf_counter()
    trainer.train(config, run_dir, task, devices=[jax.devices()[0]], log_fn=lines.append)
    wall = time.perf_counter() - t
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    logged = [r for r in rows if "examples_per_sec" in r]
    steady = logged[1:] or logged
    mean = lambda key: (
        sum(r[key] for r in steady if key in r) / max(1, sum(key in r for r in steady))  # noqa: E731
        if any(key in r for r in steady)
        else None
    )
    eps = mean("examples_per_sec")
    alone = host_batch_seconds(config, task, 3)
    return {
        "dtype": dtype,
        "steps": steps,
        "log_every": log_every,
        "windows": len(steady),
        "host_batch_seconds": alone["median"],
        "host_batch_fraction": alone["median"] * eps / int(config.batch_size) if eps else None,
        "wall_seconds": wall,
        "examples_per_sec": eps,
        "step_seconds": int(config.batch_size) / eps if eps else None,
        "data_wait_fraction": mean("data_wait_fraction"),
        "trainer_mfu": mean("mfu"),
        "batch_fn_fraction": mean("batch_fn_fraction"),
        "num_workers": int(config.data.num_workers),
        "final_loss": steady[-1].get("loss"),
    }


def measure_model(model: str, overrides: dict, preset: dict, peaks: dict) -> dict:
    config = model_config(model, overrides)
    workdir = tempfile.mkdtemp(prefix=f"bench_mfu_{model}_")
    try:
        config.compute_dtype = "float32"
        batch = first_batch(config, make_task(model, config, workdir))
        result = {
            "model": model,
            "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
            "batch_size": int(config.batch_size),
            "steps": {},
        }
        state0 = None
        for dtype in preset["dtypes"]:
            common.log(f"mfu: {model} pure step {dtype}")
            result["steps"][dtype], state0 = pure_step(
                model, config, workdir, dtype, batch, preset["pure_steps"], state0, preset["fast_compile"]
            )
        del state0
        first = next(iter(result["steps"].values()))
        result["analytic_flops_per_step"] = first["analytic_flops_per_step"]
        result["xla_flops_per_step"] = xla_flops_unrolled(
            model, config, workdir, batch, preset["fast_compile"]
        )
        result["analytic_over_xla"] = (
            first["analytic_flops_per_step"] / result["xla_flops_per_step"]
            if result["xla_flops_per_step"]
            else None
        )
        common.log(f"mfu: {model} trainer loop ({preset['trainer_steps']} steps)")
        result["trainer"] = trainer_run(
            model, config, workdir, preset["trainer_steps"], preset["log_every"], preset["trainer_dtype"]
        )
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def finish_model(result: dict, peaks: dict) -> None:
    """MFU against the peaks (known only after all models ran) and the step-time breakdown."""
    flops = result["analytic_flops_per_step"]
    for dtype, s in result["steps"].items():
        peak = peaks[dtype]
        s["flops_per_sec"] = flops / s["timing"]["best"]
        s["mfu"] = s["flops_per_sec"] / peak["best_flops"]
        s["mfu_median"] = (flops / s["timing"]["median"]) / peak["median_flops"]
        s["examples_per_sec"] = result["batch_size"] / s["timing"]["best"]
    tr = result["trainer"]
    pure = result["steps"].get(tr["dtype"])
    if tr["step_seconds"] and pure:
        # Median pure step against the trainer's mean step: both are typical, not lucky, times.
        compute = min(pure["timing"]["median"] / tr["step_seconds"], 1.0)
        wait = tr["data_wait_fraction"] or 0.0
        hook = tr.get("batch_fn_fraction") or 0.0
        tr["breakdown"] = {
            "compute": compute,
            "data_wait": wait,
            "batch_fn": hook,
            "other": max(1.0 - compute - wait - hook, 0.0),
        }


def run(size: str = "full", models=None) -> dict:
    preset = PRESETS[common.check_size(size)]
    chosen = {k: v for k, v in preset["models"].items() if models is None or k in models}
    t0 = time.perf_counter()
    peak_runs = {
        d: [common.peak_matmul_flops(d, preset["peak_n"], preset["peak_repeats"])] for d in preset["dtypes"]
    }
    results = [measure_model(m, o, preset, peak_runs) for m, o in chosen.items()]
    for d in preset["dtypes"]:  # again after the models: the best of both is the reference
        peak_runs[d].append(common.peak_matmul_flops(d, preset["peak_n"], preset["peak_repeats"]))
    peaks = {d: common.best_peak(runs) for d, runs in peak_runs.items()}
    for r in results:
        finish_model(r, peaks)
    out = {
        "name": "mfu",
        "size": size,
        "peaks": peaks,
        "models": results,
        "seconds": time.perf_counter() - t0,
    }
    out["targets"] = targets(out)
    return out


def targets(out: dict) -> list[dict]:
    rows = []
    for r in out["models"]:
        if r["model"] in TRANSFORMERS:
            for dtype, s in r["steps"].items():
                met = s["mfu"] >= MFU_TARGET
                why = "" if met else mfu_diagnosis(r, dtype, out)
                rows.append(
                    common.target(
                        f"MFU {r['model']} train step ({dtype})",
                        common.pct(s["mfu"]),
                        f">= {MFU_TARGET:.0%}",
                        met,
                        why=why,
                    )
                )
        tr = r["trainer"]
        wait, alone = tr["data_wait_fraction"], tr.get("host_batch_fraction")
        if wait is not None:
            met = wait < DATA_WAIT_TARGET
            why = ""
            if not met and alone is not None and alone < DATA_WAIT_TARGET:
                why = (
                    f"a batch made alone takes {common.pct(alone)} of a step: the wait is the "
                    "device, not the data"
                )
            elif not met:
                why = (
                    f"a batch made alone takes {common.pct(alone)} of a step and num_workers="
                    f"{tr['num_workers']} makes it in the training thread: set data.num_workers "
                    ">= 1 so it overlaps the step"
                )
            rows.append(
                common.target(
                    f"data wait, {r['model']} shapes trainer",
                    common.pct(wait),
                    f"< {DATA_WAIT_TARGET:.0%} of step time",
                    met,
                    why=why,
                )
            )
    return rows


WIDTH_KEYS = {"dalle": "model.d_model", "clip": "model.vision_width", "dvae": "model.hidden"}


def mfu_diagnosis(r: dict, dtype: str, out: dict) -> str:
    """Why a step misses the MFU target, from what this run measured."""
    s, peaks = r["steps"][dtype], out["peaks"]
    parts = [f"{common.pct(s['mfu'])} (median {common.pct(s['mfu_median'])})"]
    if dtype == "bfloat16":
        ratio = peaks["bfloat16"]["best_flops"] / peaks["float32"]["best_flops"]
        f32 = r["steps"].get("float32")
        slower = (
            f" and the bf16 step is {s['timing']['best'] / f32['timing']['best']:.1f}x slower than float32"
            if f32
            else ""
        )
        if ratio < 1.5:
            parts.append(
                f"no bf16 matrix units in use: the bf16 peak is {ratio:.2f}x float32{slower}, "
                "so XLA:CPU does not run bf16 dots natively here; on a CPU with AMX exposed "
                "(amx_bf16 flag) and jax >= 0.11 the bf16 peak is ~3.5x float32; there the "
                "step's float32 work (layernorm, softmax, AdamW) bounds bf16 MFU instead"
            )
        else:
            parts.append(
                f"the bf16 peak here is {ratio:.1f}x float32 (matrix units); the step's "
                "non-matmul work (layernorm, softmax, GELU, AdamW on float32 params) does "
                "not get faster, so it takes a larger share"
            )
        return "; ".join(parts)
    width = r["overrides"].get(WIDTH_KEYS.get(r["model"], ""), "?")
    better = [
        (o["model"], o["steps"][dtype]["mfu"], o["overrides"].get(WIDTH_KEYS.get(o["model"], ""), "?"))
        for o in out["models"]
        if o is not r and dtype in o["steps"] and o["steps"][dtype]["mfu"] > s["mfu"]
    ]
    parts.append(
        f"matmuls at width {width} over short sequences (batch x tokens rows) run below the "
        "2048^3 peak, and layernorm/softmax/GELU/AdamW are memory-bound passes"
    )
    if better:
        m, mfu, w = max(better, key=lambda x: x[1])
        parts.append(f"{m} at width {w} reaches {common.pct(mfu)} in this run: a wider model meets it")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- report


def markdown(out: dict) -> str:
    peaks = out["peaks"]
    lines = [
        f"### MFU of the train step (1 device, {out['size']})",
        "",
        "Peak = best n x n x n matmul through JAX in this run (n = "
        f"{next(iter(peaks.values()))['n']}), per dtype: "
        + ", ".join(
            f"{d} {p['best_flops'] / 1e9:.0f} GFLOP/s (median {p['median_flops'] / 1e9:.0f})"
            for d, p in peaks.items()
        )
        + ". MFU = analytic model FLOP/s at the best step time "
        "over the best peak of the step's dtype (median / median in brackets).",
        "",
    ]
    rows = []
    for r in out["models"]:
        for dtype, s in r["steps"].items():
            rows.append(
                [
                    r["model"],
                    dtype,
                    r["batch_size"],
                    f"{common.fmt(s['timing']['best'])} / {common.fmt(s['timing']['median'])}",
                    common.fmt(s["examples_per_sec"]),
                    common.fmt(r["analytic_flops_per_step"] / 1e9),
                    common.fmt(r["xla_flops_per_step"] / 1e9) if r["xla_flops_per_step"] else "-",
                    common.fmt(s["flops_per_sec"] / 1e9),
                    f"{common.pct(s['mfu'])} ({common.pct(s['mfu_median'])})",
                ]
            )
    lines.append(
        common.md_table(
            [
                "model",
                "dtype",
                "batch",
                "step s (best / median)",
                "examples/s",
                "GFLOP/step analytic",
                "GFLOP/step XLA",
                "GFLOP/s",
                "MFU",
            ],
            rows,
        )
    )
    lines += [
        "",
        "Analytic FLOPs count matmuls only; XLA's count (layers unrolled) adds "
        "elementwise work and the optimizer, so analytic/XLA a little below 1 is expected: "
        + ", ".join(
            f"{r['model']} {common.fmt(r['analytic_over_xla'])}"
            for r in out["models"]
            if r["analytic_over_xla"]
        )
        + ".",
        "",
    ]
    lines += [
        f"### Where a trainer step goes (core_jax.trainer.train on shapes, "
        f"{out['models'][0]['trainer']['steps']} steps)",
        "",
    ]
    rows = []
    for r in out["models"]:
        tr = r["trainer"]
        b = tr.get("breakdown", {})
        rows.append(
            [
                r["model"],
                tr["dtype"],
                tr["num_workers"],
                common.fmt(tr["step_seconds"]),
                common.fmt(tr["examples_per_sec"]),
                common.pct(b.get("compute")),
                common.pct(tr["data_wait_fraction"]),
                common.pct(tr.get("batch_fn_fraction")),
                common.pct(b.get("other")),
                common.pct(tr.get("host_batch_fraction")),
                common.pct(tr["trainer_mfu"]),
            ]
        )
    lines.append(
        common.md_table(
            [
                "model",
                "dtype",
                "data workers",
                "trainer step s",
                "examples/s",
                "compute (pure step)",
                "data wait",
                "batch_fn",
                "other",
                "batch made alone",
                "trainer's mfu",
            ],
            rows,
        )
    )
    lines += [
        "",
        "compute = median pure-step time / trainer step time; data wait = the trainer's "
        "`data_wait_fraction` (time blocked on the host data pipeline for the next batch); "
        "batch_fn = the trainer's `batch_fn_fraction`, the task's batch hook (DALL-E: the "
        "dVAE tokenizer, device work queued behind the in-flight step); other = the rest: host-side dispatch, the metric fetch and "
        "logging every log_every steps, CPU the data threads take from the step. *batch made "
        "alone* = time to make one batch (iterator + batch_fn) with nothing else running, over "
        "the trainer step: what data costs when it cannot overlap. The trainer's own `mfu` "
        "uses its own peak measurement (n=2048, taken once at start-up).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="full", choices=common.SIZES)
    ap.add_argument("--models", default="", help="comma list (default: all)")
    args = ap.parse_args()
    res = run(args.size, [m for m in args.models.split(",") if m] or None)
    print(markdown(res))
