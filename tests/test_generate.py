"""generate CLI, CLIP reranking, editing at token level, and the fidelity evaluation, on tiny random
workdirs written the way converters/trainers write them (config.json + params checkpoint +
WORKDIR/tokenizer/merges.txt)."""

import json
import os
import subprocess
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import numpy as np
import pytest
from PIL import Image

from dalle_jax import evaluate_fidelity, generate, rerank
from dalle_jax.pipeline import Pipeline
from tests.test_unclip_generate import FIDELITY_REPORT_LAYOUT, report_layout
from tests.workdirs import random_params, tiny_dalle_workdir, tiny_dvae_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, GRID, CODES = 16, 4, 32
PROMPT = "a red circle in the top left"


def _dvae_workdir(wd):
    tiny_dvae_workdir(wd, SIZE, CODES)


def _dalle_workdir(wd, dvae_wd, pattern="full"):
    tiny_dalle_workdir(wd, dvae_wd, grid=GRID, codes=CODES, image_size=SIZE, pattern=pattern)


def _clip_workdir(wd):
    from core_jax.checkpoint import save_params
    from core_jax.text import tokenizer_from_config
    from clip_jax import model as clip_model
    from clip_jax.defaults import clip_config, model_config, text_config

    model = model_config(
        name="tiny",
        image_size=SIZE,
        patch_size=8,
        vision_width=32,
        vision_layers=1,
        vision_heads=2,
        text_width=32,
        text_layers=1,
        text_heads=2,
        embed_dim=16,
        activation="gelu",
    )
    c = clip_config(model, text_config(merges_file="", vocab_size=256 + 64 + 2 + 64, context_length=16))
    module = clip_model.clip_from_config(c)
    abstract = jax.eval_shape(lambda k: clip_model.init_params(module, k), jax.random.key(0))
    tokenizer_from_config(c.text, wd, data_source=c.data.source)
    save_params(wd, c, random_params(abstract, 3, 0.2))


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    dvae_wd, dalle_wd, clip_wd = (str(root / n) for n in ("dvae", "dalle", "clip"))
    _dvae_workdir(dvae_wd)
    _dalle_workdir(dalle_wd, dvae_wd)
    _clip_workdir(clip_wd)
    return {"dalle": dalle_wd, "clip": clip_wd, "root": root}


@pytest.fixture(scope="module")
def pipe(workdirs):
    return Pipeline.load(workdirs["dalle"])


@pytest.fixture(scope="module")
def clip(workdirs):
    from clip_jax.api import CLIPModel

    return CLIPModel.load(workdirs["clip"])


# Every sampling call below has 6 rows (batch_size 8), guided at s=3 or not guided: the sampler
# compiles twice for the whole file.
N = 6


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _run(args, workdirs, out, **preloaded):
    return generate.main(
        [
            "--workdir",
            workdirs["dalle"],
            "--out_dir",
            str(out),
            "--seed",
            "0",
            "--batch_size",
            "8",
            "--mesh",
            "none",
        ]
        + args,
        **preloaded,
    )


def test_rerank_writes_best_first(workdirs, pipe, clip, tmp_path):
    out = tmp_path / "ranked"  # loads both workdirs itself
    _run(
        [
            "--prompt",
            PROMPT,
            "--num_samples",
            str(N),
            "--top_k_rerank",
            "3",
            "--clip_workdir",
            workdirs["clip"],
            "--cond_scale",
            "3",
        ],
        workdirs,
        out,
    )
    names = sorted(os.listdir(out))
    assert names == ["000.png", "001.png", "002.png", "grid.png", "scores.json", "tokens.npy"]
    scores = json.load(open(out / "scores.json"))
    assert scores["prompt"] == PROMPT and scores["reranked"] and len(scores["all_clip_scores"]) == N
    ranked = [e["clip_score"] for e in scores["images"]]
    assert [e["rank"] for e in scores["images"]] == [0, 1, 2]
    assert ranked == sorted(scores["all_clip_scores"], reverse=True)[:3]
    assert len(set(scores["all_clip_scores"])) > 1  # samples differ, so the ranking means something
    images = np.stack([_png(out / f"{r:03d}.png") for r in range(3)])
    assert images.shape == (3, SIZE, SIZE, 3)
    # The written PNGs are the decoded tokens, and an independent CLIP pass agrees on the scores.
    np.testing.assert_array_equal(pipe.decode(np.load(out / "tokens.npy")), images)
    again = rerank.clip_scores(clip, images, PROMPT)
    np.testing.assert_allclose(again, ranked, rtol=1e-4, atol=1e-5)
    assert int(np.argmax(again)) == 0
    assert _png(out / "grid.png").shape[0] > SIZE


def test_without_clip_all_samples_in_sample_order(workdirs, pipe, tmp_path):
    out = tmp_path / "plain"
    _run(
        ["--prompt", PROMPT, "--num_samples", str(N), "--temperature", "0.7", "--seed", "5"],
        workdirs,
        out,
        pipeline=pipe,
    )
    scores = json.load(open(out / "scores.json"))
    assert not scores["reranked"] and "all_clip_scores" not in scores
    assert [e["sample"] for e in scores["images"]] == list(range(N))
    assert all("clip_score" not in e for e in scores["images"])
    expected = pipe.generate([PROMPT], N, seed=5, batch_size=8, temperature=0.7)[0]
    np.testing.assert_array_equal(np.load(out / "tokens.npy"), expected)
    assert not np.array_equal(expected, pipe.generate([PROMPT], N, seed=5, batch_size=8)[0])
    np.testing.assert_array_equal(_png(out / "004.png"), pipe.decode(expected)[4])


def test_prompts_file_layout(workdirs, pipe, clip, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle in the top left\na blue square above a green triangle\n")
    out = tmp_path / "many"
    _run(
        [
            "--prompts_file",
            str(prompts),
            "--num_samples",
            "3",
            "--top_k_rerank",
            "2",
            "--cond_scale",
            "3",
            "--clip_workdir",
            workdirs["clip"],
        ],
        workdirs,
        out,
        pipeline=pipe,
        clip=clip,
    )
    assert sorted(os.listdir(out)) == ["000", "001", "prompts.json"]
    for i, line in enumerate(prompts.read_text().splitlines()):
        assert sorted(os.listdir(out / f"{i:03d}")) == [
            "000.png",
            "001.png",
            "grid.png",
            "scores.json",
            "tokens.npy",
        ]
        assert json.load(open(out / f"{i:03d}" / "scores.json"))["prompt"] == line


def test_a_cut_prompt_is_one_warning_and_recorded_in_its_scores(workdirs, pipe, tmp_path, capsys):
    long_prompt = " ".join([PROMPT] * 4)
    count = len(pipe.tokenizer.tokenize([long_prompt])[0])
    keep = pipe.tokenizer.max_text_tokens
    assert count > keep
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n{long_prompt}\n")
    out = tmp_path / "cut"
    capsys.readouterr()
    _run(["--prompts_file", str(prompts), "--num_samples", "3"], workdirs, out, pipeline=pipe)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: 1 prompts are longer than the {keep} tokens the DALL-E reads and are cut: "
        f"lines 2 ({count} tokens)"
    ]
    assert json.load(open(out / "000" / "scores.json"))["truncated"] is None
    cut = json.load(open(out / "001" / "scores.json"))["truncated"]
    assert cut == {"dalle": {"tokens": count, "kept": keep}}


@pytest.mark.parametrize(
    "args,match",
    [
        (["--prompt", PROMPT, "--top_k_rerank", "2"], "needs --clip_workdir"),
        (
            ["--prompt", PROMPT, "--top_k_rerank", "9", "--num_samples", "4", "--clip_workdir", "."],
            "top_k_rerank must be in",
        ),
        (["--prompts_file", "EMPTY"], "holds no prompts"),
        (["--prompt", PROMPT, "--image", "BADPNG", "--rows_kept", "1"], "cannot read --image"),
        (["--prompt", PROMPT, "--image", "GOODPNG", "--inpaint_box", "2,2,3,1"], "does not fit"),
        (["--prompt", PROMPT, "--rows_kept", "2"], "needs --image"),
        (["--prompt", PROMPT, "--workdir", "/nonexistent/dalle"], "not found"),
    ],
)
def test_bad_input_is_one_line_exit_2(workdirs, pipe, tmp_path, capsys, args, match):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(tmp_path / "good.png")
    subs = {
        "EMPTY": str(tmp_path / "empty.txt"),
        "BADPNG": str(tmp_path / "bad.png"),
        "GOODPNG": str(tmp_path / "good.png"),
    }
    with pytest.raises(SystemExit) as e:
        _run(
            [subs.get(a, a) for a in args],
            workdirs,
            tmp_path / "out",
            pipeline=None if "/nonexistent/dalle" in args else pipe,
        )
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and match in err and len(err.splitlines()) == 1, err


def test_completion_keeps_rows_and_inpainting_only_the_box(pipe):
    given = np.random.default_rng(0).integers(0, CODES, (GRID * GRID,)).astype(np.int32)
    done = pipe.complete([PROMPT], given, rows_kept=2, num_samples=N, seed=1, batch_size=8, cond_scale=3.0)[0]
    kept = 2 * GRID
    np.testing.assert_array_equal(done[:, :kept], np.broadcast_to(given[:kept], (N, kept)))
    assert (done[:, kept:] != given[kept:]).any()
    painted = pipe.inpaint([PROMPT], given, (1, 1, 2, 2), num_samples=N, seed=1, batch_size=8)[0]
    painted = painted.reshape(N, GRID, GRID)
    inside = np.zeros((GRID, GRID), bool)
    inside[1:3, 1:3] = True
    grid = given.reshape(GRID, GRID)
    outside = np.broadcast_to(grid[~inside], (N, (~inside).sum()))
    np.testing.assert_array_equal(painted[:, ~inside], outside)
    assert (painted[:, inside] != grid[inside]).any()


def test_cli_completion_keeps_the_image_rows(workdirs, pipe, tmp_path):
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (SIZE, SIZE, 3), np.uint8)).save(
        tmp_path / "in.png"
    )
    source = pipe.encode_images(_png(tmp_path / "in.png")[None])[0]
    for args in (["--rows_kept", "3"], ["--variations"]):
        out = tmp_path / args[0]
        _run(
            ["--prompt", PROMPT, "--image", str(tmp_path / "in.png"), "--num_samples", str(N)] + args,
            workdirs,
            out,
            pipeline=pipe,
        )
        rows = 3 if args[0] == "--rows_kept" else 1  # variations keep a quarter of the rows
        tokens = np.load(out / "tokens.npy")
        kept = rows * GRID
        np.testing.assert_array_equal(tokens[:, :kept], np.broadcast_to(source[:kept], (N, kept)))
        assert (tokens[:, kept:] != source[kept:]).any()
        mode = json.load(open(out / "scores.json"))["mode"]
        assert mode == ("complete" if args[0] == "--rows_kept" else "variations")


def test_fidelity_eval_numbers(workdirs, pipe, clip, tmp_path, capsys):
    out = tmp_path / "fid.json"
    evaluate_fidelity.main(
        [
            "--workdir",
            workdirs["dalle"],
            "--clip_workdir",
            workdirs["clip"],
            "--split",
            "test_unseen",
            "--num_prompts",
            "2",
            "--num_samples",
            "3",
            "--cond_scale",
            "3",
            "--top_p",
            "0.7",
            "--batch_size",
            "8",
            "--workers",
            "1",
            "--out",
            str(out),
            "--images_dir",
            str(tmp_path / "grids"),
            "--dvae_ceiling",
        ],
        pipeline=pipe,
        clip=clip,
    )
    report = json.load(open(out))
    assert report["top_p"] == 0.7 and report["temperature"] == 1.0  # the demo's sampling, recorded
    # The keys an unCLIP report has too (tests/test_unclip_generate.py), so the two compare.
    assert report_layout(report) == FIDELITY_REPORT_LAYOUT and report["model"] == "dalle"
    for setting, scale in (("guided", 3.0), ("unguided", 1.0)):
        nums = report["fidelity"][setting]
        assert nums["cond_scale"] == scale
        assert all(0.0 <= nums[k] <= 1.0 for k in ("first", "mean", "clip_best", "any"))
    assert len(report["prompts"]) == 2 and len(report["prompts"][0]["guided"]) == 3
    assert {p["kind"] for p in report["prompts"]} == {"one_object", "two_object"}
    assert report["headline"]["metric"] == "clip_best" and report["headline"]["target"] == 0.6
    # Real scenes match their captions; a random dVAE's reconstructions do not.
    assert report["dvae_ceiling"] == {"originals": 1.0, "reconstructions": 0.0, "images": 2}
    assert "caption fidelity, test_unseen" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "grids")) == [
        "guided_clip_best.png",
        "guided_first.png",
        "unguided_clip_best.png",
        "unguided_first.png",
    ]


def test_fidelity_scoring_and_caption_choice():
    from core_jax.data import shapes

    captions = evaluate_fidelity.choose_captions("test_seen", 6, seed=3)
    assert captions == evaluate_fidelity.choose_captions("test_seen", 6, seed=3)
    assert captions != evaluate_fidelity.choose_captions("test_seen", 6, seed=4)
    assert set(captions) <= set(shapes.all_captions("test_seen")) and len(set(captions)) == 6
    assert sum(shapes.parse_caption(c)["position"] is not None for c in captions) == 3
    # Ground-truth scenes score 1 against their own captions and 0 against another scene's.
    examples = [shapes.make_example("test_seen", i) for i in range(4)]
    images = np.stack([[e["image"], examples[(i + 1) % 4]["image"]] for i, e in enumerate(examples)])
    fid = evaluate_fidelity.fidelity_scores(images, [e["caption"] for e in examples])
    np.testing.assert_array_equal(fid, [[1.0, 0.0]] * 4)
    s = evaluate_fidelity.summarize(fid, np.array([[0.1, 0.9]] * 4))
    assert s == {"first": 1.0, "mean": 0.5, "any": 1.0, "clip_best": 0.0}


def test_fidelity_takes_every_shapes_split():
    from core_jax.data import shapes

    parser = evaluate_fidelity.build_parser()
    for split in shapes.SPLITS:
        assert parser.parse_args(["--split", split, "--out", "r.json"]).split == split
    # Captions say nothing of size: test_ood prompts are test_seen's.
    assert evaluate_fidelity.choose_captions("test_ood", 8, seed=1) == evaluate_fidelity.choose_captions(
        "test_seen", 8, seed=1
    )


def test_subprocess_cli(workdirs, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "sub"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a green square in the center\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dalle_jax.generate",
            "--workdir",
            workdirs["dalle"],
            "--prompts_file",
            str(prompts),
            "--num_samples",
            "2",
            "--cond_scale",
            "2",
            "--out_dir",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out / "000")) == ["000.png", "001.png", "grid.png", "scores.json", "tokens.npy"]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dalle_jax.generate",
            "--workdir",
            workdirs["dalle"],
            "--prompt",
            PROMPT,
            "--top_k_rerank",
            "2",
            "--out_dir",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_unrolled_sampling_params_give_the_scanned_model(workdirs, pipe):
    from dalle_jax.transformer import DalleTransformer, input_stream

    scanned = Pipeline.load(workdirs["dalle"], unroll_layers=False)
    assert scanned.cfg.scan_layers and not pipe.cfg.scan_layers
    stream = input_stream(
        pipe.encode_text([PROMPT, None]), np.random.default_rng(0).integers(0, CODES, (2, GRID * GRID))
    )
    a = DalleTransformer(scanned.cfg).apply({"params": scanned.params}, stream, heads="image")
    b = DalleTransformer(pipe.cfg).apply({"params": pipe.params}, stream, heads="image")
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert float(np.abs(a).max()) > 0.1


def _drop_legacy_masks_key(wd, value=None):
    """config.json as older versions wrote it (no model.legacy_masks), or with `value` set."""
    path = os.path.join(wd, "config.json")
    config = json.load(open(path))
    config["model"].pop("legacy_masks", None)
    if value is not None:
        config["model"]["legacy_masks"] = value
    json.dump(config, open(path, "w"))


def test_old_sparse_workdir_is_refused_until_marked_legacy(workdirs, tmp_path, capsys):
    import shutil
    from core_jax.config import ConfigError

    old = str(tmp_path / "old")
    _dalle_workdir(old, str(workdirs["root"] / "dvae"), pattern="row,column,conv")
    _drop_legacy_masks_key(old)
    fix = f'add "legacy_masks": true to the "model" section of {old}/config.json'
    with pytest.raises(ConfigError, match=f"^{old}/config.json has no model.legacy_masks") as e:
        Pipeline.load(old)
    assert fix in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:  # generate (and evaluate_fidelity) go through Pipeline.load
        generate.main(
            ["--workdir", old, "--prompt", PROMPT, "--out_dir", str(tmp_path / "out"), "--mesh", "none"]
        )
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and fix in err and len(err.splitlines()) == 1, err
    _drop_legacy_masks_key(old, True)  # the fix: the recorded config decides the masks
    assert Pipeline.load(old).cfg.legacy_masks
    _drop_legacy_masks_key(old, False)
    assert not Pipeline.load(old).cfg.legacy_masks
    full = str(tmp_path / "full")  # a 'full' model recorded without the key: loads as it is
    shutil.copytree(workdirs["dalle"], full)
    _drop_legacy_masks_key(full)
    assert Pipeline.load(full).cfg.layer_kinds == ("full",)


@pytest.fixture(scope="module")
def no_dropout_workdir(workdirs):
    """The same model, its config.json saying it was trained without caption dropout."""
    import shutil

    wd = str(workdirs["root"] / "dalle_no_dropout")
    shutil.copytree(workdirs["dalle"], wd)
    path = os.path.join(wd, "config.json")
    config = json.load(open(path))
    config["model"]["caption_dropout"] = 0.0
    json.dump(config, open(path, "w"))
    return wd


def test_guidance_refused_on_a_model_trained_without_caption_dropout(no_dropout_workdir, tmp_path, capsys):
    from core_jax.config import ConfigError

    args = [
        "--workdir",
        no_dropout_workdir,
        "--prompt",
        PROMPT,
        "--num_samples",
        str(N),
        "--seed",
        "0",
        "--batch_size",
        "8",
        "--mesh",
        "none",
    ]
    with pytest.raises(SystemExit) as e:
        generate.main(args + ["--out_dir", str(tmp_path / "a"), "--cond_scale", "3"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "caption_dropout=0" in err and "--force_guidance" in err
    with pytest.raises(SystemExit) as e:
        evaluate_fidelity.main(
            [
                "--workdir",
                no_dropout_workdir,
                "--num_prompts",
                "2",
                "--num_samples",
                "1",
                "--out",
                str(tmp_path / "f.json"),
            ]
        )  # s=3
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "caption_dropout=0" in err, err
    assert not (tmp_path / "f.json").exists()
    # s = 1 needs no unconditional stream; --force_guidance is the user's explicit choice.
    generate.main(args + ["--out_dir", str(tmp_path / "b")])
    generate.main(args + ["--out_dir", str(tmp_path / "c"), "--cond_scale", "3", "--force_guidance"])
    assert len(np.load(tmp_path / "c" / "tokens.npy")) == N
    # The Python API: the same check, the same opt-in.
    pipe = Pipeline.load(no_dropout_workdir)
    with pytest.raises(ConfigError, match="caption_dropout=0"):
        pipe.generate([PROMPT], N, seed=0, batch_size=8, cond_scale=3.0)
    forced = pipe.generate([PROMPT], N, seed=0, batch_size=8, cond_scale=3.0, force_guidance=True)
    np.testing.assert_array_equal(forced[0], np.load(tmp_path / "c" / "tokens.npy"))
    assert pipe.generate([PROMPT], N, seed=0, batch_size=8).shape == (1, N, GRID * GRID)
