"""The benchmark suite: `make bench` = `python -m bench.run_all`.

Runs every bench, writes bench/results.json (all figures) and bench/RESULTS.md (the tables the README
shows, with the machine they ran on), and prints the targets table. Every ratio is measured in one
run against its reference, so it holds on a noisy machine. See bench/README.md.

    python -m bench.run_all                      # everything, ~30 min on 2 cores
    python -m bench.run_all --quick              # smaller/fewer measurements; writes runs/bench_quick/
    python -m bench.run_all --only mfu,sampling  # some benches, merged into the existing results
    python -m bench.run_all --only unclip --unclip_clip_workdir CW --unclip_decoder_workdir DW
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

from bench import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHES = ("mfu", "clip_vs_openclip", "sampling", "memory", "compile", "loader", "unclip")
DEFAULT_OUT = os.path.join(REPO, "bench", "results.json")
DEFAULT_MD = os.path.join(REPO, "bench", "RESULTS.md")
QUICK_DIR = os.path.join(REPO, "runs", "bench_quick")

LOADER_PRESETS = {
    "full": ["--shards", "4", "--per_shard", "128", "--batch", "32", "--batches", "16", "--workers", "1,2"],
    "quick": ["--shards", "2", "--per_shard", "64", "--batch", "32", "--batches", "4", "--workers", "1,2"],
    "toy": [
        "--shards",
        "1",
        "--per_shard",
        "8",
        "--batch",
        "4",
        "--batches",
        "1",
        "--workers",
        "1",
        "--image_size",
        "64",
    ],
}


# ----------------------------------------------------------------------------- the input pipeline


def run_loader(size: str = "full") -> dict:
    """bench/bench_loader.py (the data pipeline's own bench) in a subprocess: images/s per worker for
    decode + augment of 256x256 JPEG WebDataset shards."""
    t0 = time.perf_counter()
    args = LOADER_PRESETS[common.check_size(size)]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "bench_loader.py"), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=1200,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench_loader.py failed ({proc.returncode}): {proc.stderr[-2000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "name": "loader",
        "size": size,
        "args": args,
        "report": report,
        "targets": [],
        "seconds": time.perf_counter() - t0,
    }


def loader_markdown(out: dict) -> str:
    r = out["report"]
    lines = [
        f"### Input pipeline ({out['size']})",
        "",
        f"{r['source']}; {r['pipeline']}; batch {r['batch']}; {r['cpu_count']} CPUs, load "
        f"{r['load_avg_1m']} at the end (bench/bench_loader.py).",
        "",
    ]
    rows = [
        [
            x["workers"],
            common.fmt(x["images_per_s"]),
            common.fmt(x["images_per_s_per_worker"]),
            common.fmt(x["cpu_ms_per_image"]),
        ]
        for x in r["results"]
    ]
    lines.append(common.md_table(["workers", "images/s", "images/s per worker", "CPU ms per image"], rows))
    lines += [
        "",
        "CPU ms per image is process CPU time per image: the figure that holds on a busy "
        "machine (images/s per core = 1000 / it). Whether the trainers wait for data is in the "
        "MFU section's breakdown (data wait).",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running


def run_one(name: str, size: str, openclip_python: str | None, unclip_workdirs: dict | None = None) -> dict:
    if name == "mfu":
        from bench import bench_mfu

        return bench_mfu.run(size)
    if name == "clip_vs_openclip":
        from bench import bench_clip_vs_openclip

        return bench_clip_vs_openclip.run(size, openclip_python)
    if name == "sampling":
        from bench import bench_sampling

        return bench_sampling.run(size)
    if name == "memory":
        from bench import bench_memory

        return bench_memory.run_subprocess(size)
    if name == "compile":
        from bench import bench_compile

        return bench_compile.run(size)
    if name == "loader":
        return run_loader(size)
    if name == "unclip":
        from bench import bench_unclip

        workdirs = {k: v for k, v in (unclip_workdirs or {}).items() if v}
        if not {"clip_workdir", "decoder_workdir"} <= set(workdirs):
            return bench_unclip.skipped(
                size,
                "give --unclip_clip_workdir and --unclip_decoder_workdir (a trained shapes CLIP and decoder)",
            )
        return bench_unclip.run(size, **workdirs)
    raise ValueError(f"unknown bench {name!r}; choose from {BENCHES}")


def section(name: str, result: dict) -> str:
    if "error" in result:
        return f"### {name}\n\nFAILED: `{result['error']}`"
    if name == "loader":
        return loader_markdown(result)
    module = __import__(f"bench.bench_{name}", fromlist=["markdown"])
    return module.markdown(result)


def targets_table(benches: dict) -> str:
    rows = []
    for name in BENCHES:
        res = benches.get(name)
        if res is None:
            continue
        if "error" in res:
            rows.append([name, "bench failed", "-", "ERROR", res["error"][:200]])
            continue
        for t in res.get("targets", []):
            rows.append([t["name"], t["value"], t["goal"], common.status_text(t["met"]), t["why"]])
    return common.md_table(["target", "measured", "goal", "status", "why missed"], rows)


def render(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"**Machine**: {m['cpu_model']}"
        + (f" ({m['cpu_id']})" if m.get("cpu_id") else "")
        + f", {m['cores']} cores ({m['isa'] or 'no AVX-512'}), load average {m['load_avg_1m']} at "
        f"the start, {m.get('load_avg_1m_end', '?')} at the end; jax {m['jax']} (jaxlib {m['jaxlib']}, "
        f"{m['backend']}), Python {m['python']}; {m['date']}.",
        "",
        f"Made by `{results['command']}` in {results['seconds'] / 60:.1f} min"
        + (" (QUICK: smaller and fewer measurements)" if results["size"] == "quick" else "")
        + ". Each ratio's two sides were measured in the same run; how to read the tables: "
        "[bench/README.md](README.md).",
        "",
    ]
    runs = {n: r.get("machine", {}).get("run") for n, r in results["benches"].items()}
    if len(set(runs.values())) > 1:
        lines += [
            "Benches from different runs (`--only`), by the start of their run: "
            + ", ".join(f"{n} {d}" for n, d in runs.items())
            + ".",
            "",
        ]
    lines += ["## Targets", "", targets_table(results["benches"]), ""]
    for name in BENCHES:
        if name in results["benches"]:
            lines += [section(name, results["benches"][name]), ""]
    return "\n".join(lines)


def prepare_environment() -> None:
    """Before jax is imported: MFU is per real device, so no fake devices in this process (the
    memory bench gets its 8 in a subprocess); and this is a CPU benchmark."""
    if "jax" in sys.modules:
        common.log("warning: jax was imported before bench.run_all could drop the fake-device flag")
    os.environ["XLA_FLAGS"] = common.without_fake_devices(os.environ.get("XLA_FLAGS", ""))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def rerender(out: str, md: str) -> int:
    with open(out) as f:
        results = json.load(f)
    for name, res in results["benches"].items():
        if "error" not in res and name != "loader":
            module = __import__(f"bench.bench_{name}", fromlist=["targets"])
            res["targets"] = module.targets(res)
    write(results, out, md)
    return 0


def write(results: dict, out: str, md: str) -> None:
    """results.json and the markdown report, which is also printed."""
    for path in (out, md):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    text = render(results)
    with open(md, "w") as f:
        f.write(text + "\n")
    print(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Runs the benchmark suite (see bench/README.md).")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smaller configs and fewer steps (a few minutes); "
        "writes to runs/bench_quick/ unless --out/--md are given",
    )
    ap.add_argument("--only", default="", help=f"comma list of benches: {','.join(BENCHES)}")
    ap.add_argument(
        "--openclip_python",
        default=None,
        help="python with torch + open_clip for the CLIP comparison (default: search)",
    )
    for model in ("clip", "decoder", "upsampler"):
        ap.add_argument(
            f"--unclip_{model}_workdir",
            default=None,
            help=f"the unclip bench's trained shapes {model} (the bench is skipped without CLIP and decoder)",
        )
    ap.add_argument("--out", default=None, help="results JSON path")
    ap.add_argument("--md", default=None, help="markdown table path")
    ap.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: rebuild the markdown (and "
        "the targets' verdicts) from the results JSON with the current report code",
    )
    args = ap.parse_args(argv)
    if args.render:
        return rerender(args.out or DEFAULT_OUT, args.md or DEFAULT_MD)

    only = [b.strip() for b in args.only.split(",") if b.strip()] or list(BENCHES)
    unknown = [b for b in only if b not in BENCHES]
    if unknown:
        ap.error(f"--only: unknown bench(es) {unknown}; choose from {','.join(BENCHES)}")
    size = "quick" if args.quick else "full"
    prepare_environment()
    out = args.out or (os.path.join(QUICK_DIR, "results.json") if args.quick else DEFAULT_OUT)
    md = args.md or (os.path.join(QUICK_DIR, "RESULTS.md") if args.quick else DEFAULT_MD)

    machine = common.machine_info()
    common.log(
        f"machine: {machine['cpu_model']}, {machine['cores']} cores, load {machine['load_avg_1m']}, "
        f"jax {machine['jax']}; running {', '.join(only)} ({size})"
    )
    previous = {}
    if len(only) < len(BENCHES) and os.path.exists(out):
        with open(out) as f:
            previous = json.load(f).get("benches", {})
    t0 = time.perf_counter()
    benches = dict(previous)
    for name in only:
        common.log(f"=== {name}")
        start = common.machine_info()
        try:
            unclip = {
                f"{m}_workdir": getattr(args, f"unclip_{m}_workdir") for m in ("clip", "decoder", "upsampler")
            }
            res = run_one(name, size, args.openclip_python, unclip)
        except Exception as e:  # one broken bench must not lose the others' figures
            traceback.print_exc()
            res = {"name": name, "size": size, "error": f"{type(e).__name__}: {e}", "targets": []}
        res["machine"] = {"run": machine["date"], "date": start["date"], "load_avg_1m": start["load_avg_1m"]}
        benches[name] = res
        common.log(f"=== {name} done in {res.get('seconds', 0):.0f}s")
    results = {
        "machine": machine,
        "size": size,
        "seconds": time.perf_counter() - t0,
        "command": "python -m bench.run_all"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "benches": {n: benches[n] for n in BENCHES if n in benches},
    }
    results["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    write(results, out, md)
    common.log(f"wrote {out} and {md} ({results['seconds'] / 60:.1f} min)")
    return 1 if any("error" in benches[n] for n in only) else 0


if __name__ == "__main__":
    sys.exit(main())
