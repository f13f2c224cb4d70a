"""The benchmark suite at toy sizes: every bench runs end to end and returns the fields the report
reads, with the right types. The figures themselves are not tested (they depend on the machine)."""

import json
import math

import jax
import pytest

from bench import bench_clip_vs_openclip, bench_compile, bench_memory, bench_mfu, bench_sampling, common
from bench import run_all


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def check_result(res, name):
    assert res["name"] == name and res["size"] == "toy"
    assert finite(res["seconds"]) and res["seconds"] > 0
    for t in res["targets"]:
        assert set(t) == {"name", "value", "unit", "goal", "met", "why"}, t
        assert t["met"] in (True, False, None)
        assert t["met"] is not False or t["why"], f"a missed target must say why: {t}"
    json.dumps(res)  # results.json must be able to hold it
    text = run_all.section(name, res)
    assert text.startswith("###") and "|" in text


def check_timing(t, n=None):
    assert 0 < t["best"] <= t["median"]
    assert n is None or t["n"] == n


def test_mfu():
    res = bench_mfu.run("toy", models=("dalle",))
    check_result(res, "mfu")
    assert set(res["peaks"]) == set(bench_mfu.PRESETS["toy"]["dtypes"])
    assert all(p["best_flops"] > 0 for p in res["peaks"].values())
    (m,) = res["models"]
    assert m["model"] == "dalle" and m["batch_size"] == 4
    for s in m["steps"].values():
        check_timing(s["timing"], bench_mfu.PRESETS["toy"]["pure_steps"])
        assert 0 < s["mfu"] and finite(s["flops_per_sec"])
    assert m["analytic_flops_per_step"] > 0 and m["xla_flops_per_step"] > 0
    # XLA's count of the unrolled step holds the same matmuls plus elementwise work.
    assert 0.3 < m["analytic_over_xla"] < 1.5
    tr = m["trainer"]
    assert tr["windows"] >= 1 and tr["examples_per_sec"] > 0 and 0 <= tr["data_wait_fraction"] < 1
    assert set(tr["breakdown"]) == {"compute", "data_wait", "batch_fn", "other"}
    assert 0 <= tr["batch_fn_fraction"] < 1  # DALL-E's dVAE tokenizer hook, timed apart from data
    assert {t["name"] for t in res["targets"]} >= {
        "MFU dalle train step (float32)",
        "data wait, dalle shapes trainer",
    }


def test_clip_vs_openclip():
    python, _ = bench_clip_vs_openclip.find_openclip_python()
    res = bench_clip_vs_openclip.run("toy", openclip_python=python or "/nonexistent/python")
    check_result(res, "clip_vs_openclip")
    (r,) = res["results"]
    for p in bench_clip_vs_openclip.PRECISIONS:
        c = r["contenders"][f"ours {p}"]
        check_timing(c["timing"])
        assert c["pairs_per_sec"] > 0
    if python is None:
        assert r["open_clip"]["status"] == "not installed" and not r["ratios"]
        assert all(t["met"] is None for t in res["targets"])
    else:  # same config on both sides: the parameter counts agree exactly
        assert r["open_clip"]["params"] == r["ours_params"]
        assert len(r["ratios"]) == 4 and all(v > 0 for v in r["ratios"].values())


def test_sampling():
    res = bench_sampling.run("toy")
    check_result(res, "sampling")
    assert [(r["image_tokens"], r["kind"]) for r in res["rows"]] == [(4, "row"), (16, "row")]
    full, extrapolated = res["rows"]
    assert not full["no_cache_extrapolated"] and finite(full["extrapolation_error"])
    assert extrapolated["no_cache_extrapolated"]
    for r in res["rows"]:
        assert r["speedup"] > 0 and r["cache_tokens_per_sec"] > 0 and r["no_cache_images_per_sec"] > 0
    g = res["guidance"]
    assert g["guided_over_unguided"] > 0 and g["two_passes_seconds"] == 2 * g["unguided"]["best"]


def test_guidance_cost_cli(capsys):
    from bench import guidance_cost

    guidance_cost.main(["--size", "toy"])
    head, *rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "device" in head and [r["batch"] for r in rows] == [4, 16]  # toy: one width
    assert all(r["guided_over_unguided"] > 0 and r["guided_images_per_sec"] > 0 for r in rows)


def test_memory_in_process():
    assert jax.device_count() >= 8  # conftest's fake devices
    res = bench_memory.run("toy")
    check_result(res, "memory")
    one, eight = res["fsdp"]
    assert (one["fsdp"], eight["fsdp"]) == (1, 8)
    # The compiled step's per-device arguments agree with the state's shardings.
    for r in res["fsdp"]:
        assert r["state_bytes_per_device"] == r["state_bytes_from_shardings"]
    assert eight["state_bytes_per_device"] < one["state_bytes_per_device"] / 4
    assert [r["remat"] for r in res["remat"]] == ["none", "full"]
    assert all(r["temp"] > 0 for r in res["remat"])


def test_compile():
    res = bench_compile.run("toy")
    check_result(res, "compile")
    assert set(res["scan"]) == {"1", "2"} and res["ratio"] > 0
    assert all(v["best"]["compile"] > 0 for v in res["scan"].values())


def test_loader():
    res = run_all.run_loader("toy")
    check_result(res, "loader")
    (row,) = res["report"]["results"]
    assert row["workers"] == 1 and row["images_per_s"] > 0


def test_run_all_renders_and_rejects_unknown_bench(tmp_path):
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nope"])
    res = {
        "machine": common.machine_info(),
        "size": "toy",
        "seconds": 1.0,
        "command": "x",
        "benches": {"compile": {"name": "compile", "error": "boom", "targets": []}},
    }
    text = run_all.render(res)
    assert "ERROR" in text and "boom" in text


def test_render_recomputes_verdicts(tmp_path):
    """--render rebuilds the targets from stored figures: a slow deep compile must show as missed."""
    timing = lambda total: {"lower": 0.1, "compile": total - 0.1, "total": total}  # noqa: E731
    compile_res = {
        "name": "compile",
        "size": "toy",
        "model": bench_compile.TOY_MODEL,
        "seconds": 1.0,
        "scan": {"1": {"best": timing(1.0), "rounds": []}, "2": {"best": timing(2.0), "rounds": []}},
        "unrolled": {},
        "shallow": 1,
        "deep": 2,
        "ratio": 2.0,
        "targets": [],
    }
    out, md = tmp_path / "results.json", tmp_path / "RESULTS.md"
    out.write_text(
        json.dumps(
            {
                "machine": common.machine_info(),
                "size": "toy",
                "seconds": 1.0,
                "command": "x",
                "benches": {"compile": compile_res},
            }
        )
    )
    assert run_all.main(["--render", "--out", str(out), "--md", str(md)]) == 0
    (t,) = json.loads(out.read_text())["benches"]["compile"]["targets"]
    assert t["met"] is False and t["value"] == "2.00x" and t["why"]
    assert "MISSED" in md.read_text()


def test_fake_device_flag_is_dropped():
    flags = "--foo=1 --xla_force_host_platform_device_count=8"
    assert common.without_fake_devices(flags) == "--foo=1"
    assert common.with_fake_devices("--foo=1", 8) == flags


def test_dvae_shape_errors_counts_what_the_checker_reads_back():
    import numpy as np
    from bench.dvae_shape_errors import shape_errors
    from core_jax.data import shapes

    examples = [shapes.make_example("test_seen", i) for i in range(6)]
    originals = np.stack([e["image"] for e in examples])
    captions = [e["caption"] for e in examples]
    perfect = shape_errors(originals, originals.copy(), captions)
    assert perfect["ceiling"] == 1.0 and perfect["wrong"] == {}
    n_objects = sum(len(e["objects"]) for e in examples)
    assert sum(perfect["objects"].values()) == n_objects
    # Redraw the first scene's objects as circles (same colour and bbox): one caption fails, and
    # each of its non-circle objects is counted as read back as a circle.
    first = [dict(o, shape="circle") for o in examples[0]["objects"]]
    broken = originals.copy()
    broken[0] = shapes.render(first)
    res = shape_errors(originals, broken, captions)
    changed = [o["shape"] for o in examples[0]["objects"] if o["shape"] != "circle"]
    assert changed, "test_seen scene 0 should hold a non-circle (it is a triangle)"
    assert res["ceiling"] == 5 / 6
    assert sum(v for k, v in res["wrong"].items() if k.endswith("->circle")) == len(changed)
    blank = shape_errors(originals[:1], np.zeros_like(originals[:1]), captions[:1])
    assert blank["ceiling"] == 0.0 and sum(blank["wrong"].values()) == len(examples[0]["objects"])
    # A one-pixel shift of every object puts all of its error on edge pixels.
    shifted = np.roll(originals, 1, axis=2)
    res = shape_errors(originals, shifted, captions)
    assert res["squared_error_share_at_edges"] == 1.0 and res["psnr_if_edges_exact"] > 90
    assert res["edge_pixels_per_image"] > 0


def test_dvae_shift_probe_pairs_and_edge_error():
    import numpy as np
    from bench.dvae_shift_probe import edge_error, moved_pairs

    originals, moved, kinds = moved_pairs(12)
    assert len(kinds) == len(originals) == len(moved) >= 9 and set(kinds) == {"x", "y", "size"}
    # every move changes pixels and keeps one object colour on black
    assert all((o != m).any() for o, m in zip(originals, moved))
    assert all(len(np.unique(m.reshape(-1, 3), axis=0)) == 2 for m in moved)
    # a drawing of the target scores 0, of the other scene 1, their average (a blur) 0.5
    assert np.allclose(edge_error(originals, originals, moved), 0.0)
    assert np.allclose(edge_error(moved, originals, moved), 1.0)
    blur = (originals.astype(np.float64) + moved) / 2
    assert np.allclose(edge_error(blur, originals, moved), 0.5)


def test_demo_steps_at_toy_sizes():
    from bench import bench_demo_steps

    row = bench_demo_steps.measure("dvae", bench_mfu.TOY_MODELS["dvae"], 2)
    assert row["model"] == "dvae" and row["batch_size"] == 4 and 0 < row["best_ms"] <= row["median_ms"]
    assert row["stage_step_minutes"] > 0 and "| dvae | 4 |" in bench_demo_steps.markdown([row])
    assert bench_demo_steps.parse_sets(["scan_layers=False", "optim.name=sgd"]) == {
        "scan_layers": False,
        "optim.name": "sgd",
    }
    with pytest.raises(SystemExit, match="unknown"):
        bench_demo_steps.main(["--models", "vit"])
    with pytest.raises(SystemExit, match="key=value"):
        bench_demo_steps.parse_sets(["scan_layers"])


def fake_seed_dir(root, seed, best_unseen):
    """The files one finished `bench.shapes_seeds` seed leaves, with the figures the test expects."""
    from bench import shapes_seeds

    d = root / f"seed{seed}"
    for stage, key, value in [
        ("dvae", "eval/test_unseen/psnr", 25.0 + seed),
        ("dvae_decoder", "eval/test_unseen/psnr", 28.0),
    ]:
        (d / stage).mkdir(parents=True)
        rows = [
            {"step": 1, key: 0.0},
            {"step": 2, key: value, "eval/test_unseen/codebook_used_fraction": 0.5},
        ]
        (d / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for split in shapes_seeds.SPLITS:
        best = best_unseen if split == "test_unseen" else 0.95
        row = {"first": 0.5, "mean": 0.5, "clip_best": best}
        fidelity = {"guided": row, "unguided": dict(row, clip_best=best - 0.1)}
        ceiling = {"originals": 1.0, "reconstructions": 0.9, "images": 96}
        (d / f"fidelity_{split}.json").write_text(json.dumps({"fidelity": fidelity, "dvae_ceiling": ceiling}))
    for split in ("test_unseen", "test_ood"):
        per_class = {"green circle": {"top1": 0.5 + 0.1 * seed, "count": 10}}
        res = {
            "zeroshot/top1": 0.9,
            "zeroshot/min_class_top1": 0.5 + 0.1 * seed,
            "zeroshot/per_class": per_class,
        }
        (d / f"clip_{split}.json").write_text(json.dumps(res))
    return str(d)


def test_shapes_seeds_reads_a_seed_and_summarises_on_the_mean(tmp_path):
    """bench.shapes_seeds without its training: the figures of finished seeds, their mean and range,
    and the targets judged on the mean (CLIP-best unseen 0.55 and 0.75 average to 0.65 >= 0.60)."""
    from bench import shapes_seeds

    per_seed = {
        s: shapes_seeds.seed_figures(fake_seed_dir(tmp_path, s, best), "unused-python")
        for s, best in [(0, 0.55), (1, 0.75)]
    }
    assert per_seed[1]["dvae_psnr"] == 26.0 and per_seed[0]["test_unseen/guided/clip_best"] == 0.55
    assert per_seed[0]["test_seen/dvae_ceiling"] == 0.9
    summary = shapes_seeds.summarise(per_seed)
    assert summary["dvae_psnr"] == {"mean": 25.5, "min": 25.0, "max": 26.0}
    verdicts = dict(shapes_seeds.targets(summary))
    assert verdicts["CLIP-best, s=3, unseen >= 0.60"] and verdicts["CLIP-best, s=3, seen >= 0.90"]
    assert verdicts["test_unseen clip_best: guided >= unguided"]
    assert not verdicts["CLIP zero-shot >= 0.95 on every held-out pair"]  # min class 0.5 / 0.6
    text = shapes_seeds.markdown(per_seed, summary, {0: 60.0, 1: 120.0})
    assert "| dvae_psnr | 25.000 | 26.000 | 25.500 | 25.000-26.000 |" in text
    assert "- MISSED: CLIP zero-shot >= 0.95 on every held-out pair" in text
