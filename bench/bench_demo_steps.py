"""Train-step time of the three configs `make demo` trains, as shipped (float32, one device).

    python -m bench.bench_demo_steps                       # dvae, clip, dalle
    python -m bench.bench_demo_steps --models dalle --set scan_unroll=1

Each model's own jitted update step (core_jax.trainer.jit_train_step, compiled ahead of time) runs
on one fixed batch of the shapes data; `--set key=value` (dotted config keys, Python literals)
changes the configs to compare a variant (this machine's speed drifts by 10-20%: run both twice,
alternating). The demo's stage times are these steps times the configs' step counts, plus
compiling, evaluations and data (README, "make demo").
"""

from __future__ import annotations

import ast
import shutil
import tempfile

from bench import common
from bench.bench_mfu import apply_overrides, first_batch, make_task, model_config, pure_step

DEMO_MODELS = ("dvae", "clip", "dalle")


def parse_sets(items) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def measure(model: str, overrides: dict, steps: int) -> dict:
    """Best / median step of `model`'s config (with `overrides`) on one fixed batch."""
    config = apply_overrides(model_config(model, {}), overrides)
    workdir = tempfile.mkdtemp(prefix=f"bench_demo_{model}_")
    try:
        batch = first_batch(config, make_task(model, config, workdir))
        result, _ = pure_step(model, config, workdir, "float32", batch, steps)
        t = result["timing"]
        return {
            "model": model,
            "batch_size": int(config.batch_size),
            "steps": int(config.total_steps),
            "best_ms": 1e3 * t["best"],
            "median_ms": 1e3 * t["median"],
            "examples_per_sec": int(config.batch_size) / t["median"],
            "stage_step_minutes": t["median"] * int(config.total_steps) / 60,
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def markdown(rows) -> str:
    lines = [
        "| model | batch | step ms (best / median) | examples/s | config steps x median step |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['best_ms']:.0f} / {r['median_ms']:.0f} | "
            f"{r['examples_per_sec']:.1f} | {r['steps']} x = {r['stage_step_minutes']:.1f} min |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(DEMO_MODELS), help="comma list of dvae, clip, dalle")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per model (after one warm-up)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every model, e.g. scan_unroll=1 (repeatable)",
    )
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(DEMO_MODELS))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {DEMO_MODELS}")
    overrides = parse_sets(args.set)
    print(f"machine: {common.cpu_model()}; overrides: {overrides or 'none'}", flush=True)
    rows = [measure(m, overrides, args.steps) for m in models]
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
