"""The demo's pipeline on several seeds: the mean and range of every figure `make demo` prints.

    python -m bench.shapes_seeds --seeds 0 1 2 --out_dir runs/seeds [--num_prompts 96]

Seed N runs launch/demo.sh into OUT_DIR/seedN with the dVAE, its decoder fine-tuning, CLIP, the
DALL-E and the sampling all seeded with N, and caption fidelity scored on NUM_PROMPTS prompts of
each split (16 samples each, unguided and guided rows). Every stage resumes from its workdir, so
a rerun after an interruption picks up where it stopped (its wall time then counts only the
last attempt) and a finished seed only re-reads its outputs. DVAE_ARGS / DECODER_ARGS / CLIP_ARGS / DALLE_ARGS / SAMPLING are passed through (the seed
flags come after them). Then, per seed, CLIP's zero-shot accuracy per class on `test_unseen` and
on `test_ood` (`clip_jax.evaluate`).

Writes OUT_DIR/summary.json (every seed's figures, their mean / min / max, the targets) and prints
a markdown table. Targets are on the mean over seeds (docs/results.md explains each).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from core_jax.cli import ArgumentParser

SPLITS = ("test_seen", "test_unseen")
ROWS = ("first", "mean", "clip_best")
GUIDANCE = ("unguided", "guided")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def last_eval(metrics_file: str, key: str):
    """The last value of `key` in a metrics.jsonl (None when the run never logged it)."""
    value = None
    if not os.path.exists(metrics_file):
        return None
    with open(metrics_file) as f:
        for line in f:
            row = json.loads(line)
            if key in row:
                value = row[key]
    return value


def run_demo(seed: int, seed_dir: str, num_prompts: int, python: str) -> float:
    """Runs (or resumes) the demo for one seed; returns its wall seconds."""
    env = dict(os.environ, DEMO_DIR=seed_dir, FIDELITY_PROMPTS=str(num_prompts), PYTHON=python)
    flag = f"--config.seed={seed}"
    for name in ("DVAE_ARGS", "DECODER_ARGS", "CLIP_ARGS", "DALLE_ARGS"):
        env[name] = f"{os.environ.get(name, '')} {flag}".strip()
    sampling = os.environ.get("SAMPLING", "--cond_scale 3 --top_p 0.7")
    env["SAMPLING"] = f"{sampling} --seed {seed}"
    start = time.time()
    with open(os.path.join(seed_dir, "demo.log"), "a") as log:
        rc = subprocess.call(
            ["bash", os.path.join(REPO, "launch", "demo.sh")], env=env, stdout=log, stderr=log
        )
    if rc != 0:
        raise SystemExit(f"error: the demo for seed {seed} failed (exit {rc}); its log: {seed_dir}/demo.log")
    return time.time() - start


def clip_per_class(clip_dir: str, split: str, out: str, python: str) -> dict:
    """clip_jax.evaluate's zero-shot result on a shapes split (cached in `out`)."""
    if not os.path.exists(out):
        cmd = [
            python,
            "-m",
            "clip_jax.evaluate",
            "--workdir",
            clip_dir,
            f"--config.eval.zeroshot_split={split}",
            "--out",
            out,
        ]
        # As launch/demo.sh: the CPU unless the caller names a platform.
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
        if rc != 0:
            raise SystemExit(f"error: {' '.join(cmd)} failed (exit {rc})")
    with open(out) as f:
        return json.load(f)


def seed_figures(seed_dir: str, python: str) -> dict:
    """The figures of one finished seed, flat: name -> number."""
    fig = {
        "dvae_psnr": last_eval(f"{seed_dir}/dvae/metrics.jsonl", "eval/test_unseen/psnr"),
        "dvae_codes_used": last_eval(
            f"{seed_dir}/dvae/metrics.jsonl", "eval/test_unseen/codebook_used_fraction"
        ),
        "decoder_psnr": last_eval(f"{seed_dir}/dvae_decoder/metrics.jsonl", "eval/test_unseen/psnr"),
    }
    for split in SPLITS:
        with open(f"{seed_dir}/fidelity_{split}.json") as f:
            result = json.load(f)
        fidelity = result["fidelity"]
        # What the checker passes of the dVAE's reconstructions of real scenes: the DALL-E's ceiling.
        fig[f"{split}/dvae_ceiling"] = (result.get("dvae_ceiling") or {}).get("reconstructions")
        for g in GUIDANCE:
            for row in ROWS:
                fig[f"{split}/{g}/{row}"] = fidelity[g][row]
    for split in ("test_unseen", "test_ood"):
        res = clip_per_class(f"{seed_dir}/clip", split, f"{seed_dir}/clip_{split}.json", python)
        fig[f"clip_{split}/top1"] = res["zeroshot/top1"]
        fig[f"clip_{split}/min_class_top1"] = res["zeroshot/min_class_top1"]
        if split == "test_unseen":  # the held-out pairs, one row each
            for name, c in res["zeroshot/per_class"].items():
                fig[f"clip_{split}/class/{name}"] = c["top1"]
    return fig


def summarise(per_seed: dict[int, dict]) -> dict:
    names = list(next(iter(per_seed.values())))
    out = {}
    for name in names:
        values = [f[name] for f in per_seed.values() if f.get(name) is not None]
        if values:
            out[name] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
    return out


def targets(summary: dict) -> list[tuple[str, bool]]:
    mean = {k: v["mean"] for k, v in summary.items()}
    rows = [
        ("CLIP-best, s=3, seen >= 0.90", mean["test_seen/guided/clip_best"] >= 0.90),
        ("CLIP-best, s=3, unseen >= 0.60", mean["test_unseen/guided/clip_best"] >= 0.60),
    ]
    for split in SPLITS:
        for row in ROWS:
            g, u = mean[f"{split}/guided/{row}"], mean[f"{split}/unguided/{row}"]
            rows.append((f"{split} {row}: guided >= unguided", g >= u))
        for g in GUIDANCE:
            rows.append(
                (
                    f"{split} {g}: CLIP-best >= first sample",
                    mean[f"{split}/{g}/clip_best"] >= mean[f"{split}/{g}/first"],
                )
            )
    rows.append(
        ("CLIP zero-shot >= 0.95 on every held-out pair", mean["clip_test_unseen/min_class_top1"] >= 0.95)
    )
    rows.append(("CLIP zero-shot on test_ood >= 0.90", mean["clip_test_ood/top1"] >= 0.90))
    return rows


def markdown(per_seed: dict[int, dict], summary: dict, walls: dict[int, float]) -> str:
    seeds = sorted(per_seed)
    head = "| figure | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | range |"
    lines = [head, "| --- " * (len(seeds) + 3) + "|"]
    for name, s in summary.items():
        cells = [f"{per_seed[k].get(name):.3f}" if per_seed[k].get(name) is not None else "" for k in seeds]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {s['mean']:.3f} | {s['min']:.3f}-{s['max']:.3f} |"
        )
    if walls:
        cells = [f"{walls[k] / 60:.1f} min" if k in walls else "" for k in seeds]
        lines.append("| demo wall time | " + " | ".join(cells) + " | | |")
    lines.append("")
    lines += [f"- {'met' if ok else 'MISSED'}: {name}" for name, ok in targets(summary)]
    return "\n".join(lines)


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out_dir", default="runs/seeds")
    parser.add_argument("--num_prompts", type=int, default=96, help="prompts per split for caption fidelity")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    if args.num_prompts < 1 or len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        parser.error("--num_prompts must be >= 1 and --seeds distinct non-negative integers")
    per_seed, walls = {}, {}
    for seed in args.seeds:
        seed_dir = os.path.join(args.out_dir, f"seed{seed}")
        os.makedirs(seed_dir, exist_ok=True)
        done = os.path.join(seed_dir, "demo_seconds.json")
        if not os.path.exists(done):  # a finished seed is only read again
            with open(done + ".tmp", "w") as f:
                json.dump(run_demo(seed, seed_dir, args.num_prompts, args.python), f)
            os.replace(done + ".tmp", done)
        with open(done) as f:
            walls[seed] = json.load(f)
        per_seed[seed] = seed_figures(seed_dir, args.python)
        print(f"seed {seed}: {walls[seed] / 60:.1f} min", flush=True)
    summary = summarise(per_seed)
    result = {"seeds": per_seed, "summary": summary, "demo_seconds": walls, "num_prompts": args.num_prompts}
    result["targets"] = {name: ok for name, ok in targets(summary)}
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(per_seed, summary, walls))


if __name__ == "__main__":
    main()
