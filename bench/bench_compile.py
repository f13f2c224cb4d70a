"""Compile time of the DALL-E train step against depth: with scan over layers the compiled program
holds one layer body whatever the depth, so 32 layers should cost little more than 4.

Each depth is traced (`lower`) and compiled (`compile`) from shapes only on one device, in
alternating rounds (the best round of each counts, so a busy machine slows both alike). The
unrolled stack (scan_layers=False) is timed at small depths for contrast.
"""

from __future__ import annotations

import time

from bench import common

MODEL = {
    "model.d_model": 512,
    "model.num_heads": 8,
    "model.head_dim": 64,
    "model.mlp_dim": 2048,
    "model.text_vocab_size": 512,
    "batch_size": 8,
}
TOY_MODEL = {
    "model.d_model": 32,
    "model.num_heads": 2,
    "model.head_dim": 16,
    "model.mlp_dim": 64,
    "model.text_vocab_size": 64,
    "model.image_vocab_size": 64,
    "batch_size": 2,
}
PRESETS = {
    "full": dict(model=MODEL, depths=(4, 32), rounds=2, unrolled_depths=(4, 8), fast_compile=False),
    "quick": dict(model=MODEL, depths=(4, 32), rounds=1, unrolled_depths=(), fast_compile=False),
    "toy": dict(model=TOY_MODEL, depths=(1, 2), rounds=1, unrolled_depths=(), fast_compile=True),
}
RATIO_TARGET = 1.5


def compile_seconds(overrides: dict, layers: int, scan: bool, fast_compile: bool = False) -> dict:
    """(lower seconds, compile seconds) of a fresh jitted train step of a `layers`-deep DALL-E."""
    import jax
    from bench.bench_mfu import apply_overrides, load_config
    from core_jax import sharding, trainer
    from core_jax.optim import make_optimizer
    from dalle_jax import dalle_task

    config = apply_overrides(load_config("dalle_shapes"), overrides)
    config.model.num_layers = layers
    config.scan_layers = scan
    task = dalle_task.make_task(config, None)
    mesh = common.one_device_mesh()
    batch = {
        k: jax.ShapeDtypeStruct(
            s.shape, s.dtype, sharding=sharding.batch_sharding(mesh, len(s.shape), s.shape[0])
        )
        for k, s in task.batch_spec(int(config.batch_size)).items()
    }
    tx, schedule = make_optimizer(config.optim, config.total_steps)
    t0 = time.perf_counter()
    _, abstract, shardings = trainer.state_shardings(task, tx, mesh, config, batch)
    step = trainer.jit_train_step(
        task, tx, schedule, config, mesh, shardings, jax.tree.map(lambda x: x.sharding, batch)
    )
    with jax.set_mesh(mesh):
        lowered = step.lower(abstract, batch)
        t1 = time.perf_counter()
        common.compile_lowered(lowered, fast_compile)
    t2 = time.perf_counter()
    return {"lower": t1 - t0, "compile": t2 - t1, "total": t2 - t0}


def run(size: str = "full") -> dict:
    import jax

    preset = PRESETS[common.check_size(size)]
    t0 = time.perf_counter()
    # A fresh jitted function per call, so nothing is cached in memory; no persistent cache either.
    jax.config.update("jax_enable_compilation_cache", False)
    samples = {d: [] for d in preset["depths"]}
    for r in range(preset["rounds"]):
        # Deepest first in the first round: the very first compile of a process pays one-off costs,
        # which must not flatter the ratio.
        order = sorted(preset["depths"], reverse=(r % 2 == 0))
        for d in order:
            common.log(f"compile: {d} layers, scan, round {r + 1}")
            samples[d].append(compile_seconds(preset["model"], d, True, preset["fast_compile"]))
    best = {d: min(s, key=lambda x: x["total"]) for d, s in samples.items()}
    unrolled = {}
    for d in preset["unrolled_depths"]:
        common.log(f"compile: {d} layers, unrolled")
        unrolled[d] = compile_seconds(preset["model"], d, False, preset["fast_compile"])
    lo, hi = min(preset["depths"]), max(preset["depths"])
    out = {
        "name": "compile",
        "size": size,
        "model": dict(preset["model"]),
        "scan": {str(d): {"best": best[d], "rounds": samples[d]} for d in preset["depths"]},
        "unrolled": {str(d): v for d, v in unrolled.items()},
        "shallow": lo,
        "deep": hi,
        "ratio": best[hi]["total"] / best[lo]["total"],
        "seconds": time.perf_counter() - t0,
    }
    out["targets"] = targets(out)
    return out


def targets(out: dict) -> list[dict]:
    met = out["ratio"] < RATIO_TARGET
    why = (
        ""
        if met
        else (
            f"{out['ratio']:.2f}x: something in the step grows with depth outside the "
            "scanned body (per-layer mask kinds, unstacked params, optimizer per leaf)"
        )
    )
    return [
        common.target(
            f"compile {out['deep']} vs {out['shallow']} layers (scan)",
            f"{out['ratio']:.2f}x",
            f"< {RATIO_TARGET}x",
            met,
            why=why,
        )
    ]


def markdown(out: dict) -> str:
    m = out["model"]
    lines = [
        f"### Compile time vs depth (DALL-E train step, 1 device, {out['size']})",
        "",
        f"d_model {m['model.d_model']}, mlp {m['model.mlp_dim']}, batch {m['batch_size']}; "
        "trace (lower) + XLA compile, best of the rounds.",
        "",
    ]
    rows = [
        [
            d,
            "scan",
            common.fmt(v["best"]["lower"]),
            common.fmt(v["best"]["compile"]),
            common.fmt(v["best"]["total"]),
        ]
        for d, v in out["scan"].items()
    ]
    rows += [
        [d, "unrolled", common.fmt(v["lower"]), common.fmt(v["compile"]), common.fmt(v["total"])]
        for d, v in out["unrolled"].items()
    ]
    lines.append(common.md_table(["layers", "stack", "lower s", "compile s", "total s"], rows))
    lines += ["", f"{out['deep']} / {out['shallow']} layers with scan: **{out['ratio']:.2f}x**."]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="full", choices=common.SIZES)
    print(markdown(run(ap.parse_args().size)))
