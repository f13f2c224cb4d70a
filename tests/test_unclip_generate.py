"""`python -m dalle_jax.unclip.generate` and `evaluate_fidelity --model unclip` on tiny random
workdirs: dalle_jax.generate's layout for one prompt and for a prompts file (read by
contact_sheet), reranking best first with the scores it records, embeddings.npy in the images'
order, every prompt in one batch per stage, the same seed giving the same PNGs, an over-long prompt
warned about, the fidelity report with the DALL-E report's keys, the flags documented in --help,
and every bad input one `error:` line with exit code 2 and nothing written.

The models are random (a CLIP of width 16 on 16x16 images with 8-dim embeddings, a one-block prior
of width 16, a one-level U-Net decoder drawing 8x8 images, an 8 -> 16 upsampler) and sample with 2
steps: the cost is compiling each stage once for 4 rows (the decoder guided and unguided).
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from clip_jax.api import CLIPModel
from dalle_jax import contact_sheet, evaluate_fidelity, rerank
from dalle_jax.unclip import generate
from dalle_jax.unclip.api import Upsampler
from dalle_jax.unclip.text_to_image import TextToImage, check_guidance, check_stack, read_configs
from tests.workdirs import (
    tiny_clip_workdir,
    tiny_unclip_decoder_workdir,
    tiny_unclip_prior_workdir,
    tiny_unclip_upsampler_workdir,
)

PROMPT = "a red circle in the top left"
STEPS = ["--steps", "2", "--prior_steps", "2"]
ROWS = 4  # every run samples 4 rows, so each stage compiles once (twice for the decoder: s = 3 and 1)
# What dalle_jax.generate's scores.json holds besides its own sampling flags (tests/test_generate.py
# reads the same files).
SHARED_SCORES_KEYS = {
    "model",
    "mode",
    "clip_workdir",
    "num_samples",
    "seed",
    "batch_size",
    "top_k_rerank",
    "prompt",
    "reranked",
    "images",
    "all_clip_scores",
    "truncated",
}
# The fidelity report's layout apart from each model's own settings; tests/test_generate.py checks
# that the DALL-E report has it too.
FIDELITY_REPORT_LAYOUT = {
    "top": [
        "batch_size",
        "by_kind",
        "clip_workdir",
        "cond_scale",
        "fidelity",
        "headline",
        "model",
        "num_prompts",
        "num_samples",
        "prompts",
        "seed",
        "split",
        "timing",
    ],
    "fidelity": ["any", "clip_best", "cond_scale", "first", "mean"],
    "by_kind": ["any", "clip_best", "first", "mean"],
    "timing": [
        "check_seconds",
        "clip_seconds",
        "decode_seconds",
        "images",
        "images_per_second_sampling",
        "sample_seconds",
        "seconds_per_image",
    ],
    "prompt": ["caption", "guided", "guided_clip", "kind", "unguided", "unguided_clip"],
    "headline": ["meets_target", "metric", "setting", "target", "value"],
}
# Each model's own settings (and the DALL-E's optional --dvae_ceiling section).
MODEL_KEYS = {
    "dalle": {"workdir", "dvae_workdir", "temperature", "top_k", "top_p", "dvae_ceiling"},
    "unclip": {
        "prior_workdir",
        "decoder_workdir",
        "upsampler_workdir",
        "prior_scale",
        "prior_sampler",
        "prior_steps",
        "sampler",
        "steps",
        "best_of",
        "image_size",
    },
}


def report_layout(report: dict) -> dict:
    """The keys of a fidelity report (guided and unguided rows, CLIP given), its model's own keys
    left out."""
    return {
        "top": sorted(set(report) - MODEL_KEYS[report["model"]]),
        "fidelity": sorted(report["fidelity"]["guided"]),
        "by_kind": sorted(report["by_kind"]["one_object"]["guided"]),
        "timing": sorted(report["timing"]["guided"]),
        "prompt": sorted(report["prompts"][0]),
        "headline": sorted(report["headline"]),
    }


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    clip = tiny_clip_workdir(str(root / "clip"), image_size=16)
    return {
        "root": root,
        "clip": clip,
        "prior": tiny_unclip_prior_workdir(str(root / "prior"), clip),
        "decoder": tiny_unclip_decoder_workdir(str(root / "decoder"), clip, image_size=8),
        "upsampler": tiny_unclip_upsampler_workdir(str(root / "upsampler"), low_res_size=8, factor=2),
    }


@pytest.fixture(scope="module")
def models(workdirs):
    return TextToImage.load(workdirs["prior"], workdirs["decoder"])


@pytest.fixture(scope="module")
def upsampled(workdirs, models):
    """The same prior and decoder (and their compiled samplers) with the upsampler."""
    return TextToImage(models.prior, models.decoder, Upsampler.load(workdirs["upsampler"]))


@pytest.fixture(scope="module")
def clip(workdirs):
    return CLIPModel.load(workdirs["clip"])


def run(workdirs, out, *extra, **preloaded):
    argv = ["--prior_workdir", workdirs["prior"], "--decoder_workdir", workdirs["decoder"]]
    return generate.main(argv + STEPS + ["--out_dir", str(out), *extra], **preloaded)


def files(n: int) -> list[str]:
    """What dalle_jax.generate writes for one prompt, tokens.npy as embeddings.npy."""
    return [f"{i:03d}.png" for i in range(n)] + ["embeddings.npy", "grid.png", "scores.json"]


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_one_prompt_upsampled_in_sample_order(workdirs, upsampled, tmp_path):
    out = tmp_path / "one"
    extra = ["--upsampler_workdir", workdirs["upsampler"], "--decoder_scale", "3", "--seed", "3"]
    run(workdirs, out, *extra, "--prompt", PROMPT, "--num_samples", str(ROWS), models=upsampled)
    assert sorted(os.listdir(out)) == files(ROWS)
    scores = json.loads((out / "scores.json").read_text())
    assert SHARED_SCORES_KEYS - {"all_clip_scores"} <= set(scores) and "all_clip_scores" not in scores
    assert scores["model"] == "unclip" and scores["prompt"] == PROMPT and not scores["reranked"]
    assert scores["truncated"] is None
    assert (scores["decoder_scale"], scores["steps"], scores["prior_steps"]) == (3.0, 2, 2)
    assert scores["upsampler_workdir"] == workdirs["upsampler"] and scores["image_size"] == 16
    assert [(e["file"], e["rank"], e["sample"]) for e in scores["images"]] == [
        (f"{i:03d}.png", i, i) for i in range(ROWS)
    ]
    images = np.stack([png(out / f"{i:03d}.png") for i in range(ROWS)])
    assert images.shape == (ROWS, 16, 16, 3)  # the upsampler's size
    # The files are the draw of the same seed and batch, images and embeddings alike.
    again = upsampled.generate([PROMPT], ROWS, seed=3, decoder_scale=3.0, steps=2, prior_steps=2)
    np.testing.assert_array_equal(images, again.images[0])
    embeddings = np.load(out / "embeddings.npy")
    np.testing.assert_array_equal(embeddings, again.embeddings[0])
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, rtol=1e-5)
    assert len({e.tobytes() for e in embeddings}) == ROWS  # every sample its own
    assert png(out / "grid.png").shape[0] > 16


def test_prompts_file_in_one_batch_reranked_and_read_by_contact_sheet(
    workdirs, models, clip, tmp_path, monkeypatch
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle in the top left\na blue square above a green triangle\n")
    lines = prompts.read_text().splitlines()
    batches, drawn, sample = [], [], models.prior.sample

    def recorded(captions, **kwargs):
        batches.append(list(captions))
        drawn.append(sample(captions, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(models.prior, "sample", recorded)
    out = tmp_path / "many"
    extra = ["--prompts_file", str(prompts), "--num_samples", "2", "--decoder_scale", "3"]
    run(
        workdirs,
        out,
        *extra,
        "--top_k_rerank",
        "2",
        "--clip_workdir",
        workdirs["clip"],
        models=models,
        clip=clip,
    )
    assert batches == [[lines[0]] * 2 + [lines[1]] * 2]  # both prompts, one batch
    assert sorted(os.listdir(out)) == ["000", "001", "prompts.json"]
    assert json.loads((out / "prompts.json").read_text()) == {"000": lines[0], "001": lines[1]}
    images, ranked, embeddings = [], [], drawn[0].reshape(2, 2, -1)
    for i, line in enumerate(lines):
        folder = out / f"{i:03d}"
        assert sorted(os.listdir(folder)) == files(2)
        scores = json.loads((folder / "scores.json").read_text())
        assert SHARED_SCORES_KEYS <= set(scores) and scores["prompt"] == line and scores["reranked"]
        entries = scores["images"]
        assert [(e["file"], e["rank"]) for e in entries] == [("000.png", 0), ("001.png", 1)]
        assert [e["clip_score"] for e in entries] == sorted(scores["all_clip_scores"], reverse=True)
        assert [scores["all_clip_scores"][e["sample"]] for e in entries] == [e["clip_score"] for e in entries]
        ranked.append([e["clip_score"] for e in entries])
        images.append([png(folder / e["file"]) for e in entries])
        order = [e["sample"] for e in entries]
        np.testing.assert_array_equal(np.load(folder / "embeddings.npy"), embeddings[i, order])
    # An independent CLIP pass agrees with the recorded scores, so the files are best first.
    again = rerank.group_scores(clip, np.asarray(images), lines)
    np.testing.assert_allclose(again, ranked, rtol=1e-4, atol=1e-5)
    assert (again[:, 0] >= again[:, 1]).all() and len(set(again.ravel().tolist())) == 4
    rows = contact_sheet.read_run(str(out))
    assert [caption for caption, _ in rows] == lines and all(len(ims) == 2 for _, ims in rows)
    assert (
        contact_sheet.main(["--samples_dir", str(out), "--out", str(tmp_path / "sheet.png"), "--scale", "1"])
        == 0
    )
    assert png(tmp_path / "sheet.png").shape[0] == 2 * (8 + contact_sheet.PAD) + contact_sheet.PAD


def test_same_seed_same_pngs_and_an_overlong_prompt_warned(workdirs, models, tmp_path, capsys):
    tokenizer = models.prior.clip.tokenizer
    long_prompt = " ".join([PROMPT] * 4)
    count = len(tokenizer.tokenize([long_prompt])[0])
    assert count > tokenizer.max_text_tokens
    assert tokenizer.overlong([PROMPT, long_prompt]) == [(1, count)]
    # encode keeps exactly max_text_tokens of it: start, the first tokens, end.
    ids = tokenizer.encode([long_prompt])[0]
    assert (
        list(ids[1 : tokenizer.max_text_tokens + 1])
        == tokenizer.tokenize([long_prompt])[0][: tokenizer.max_text_tokens]
    )
    assert ids[tokenizer.max_text_tokens + 1] == tokenizer.end_id

    written = {}
    for name, seed, prompt in (("a", "1", long_prompt), ("b", "1", long_prompt), ("c", "2", long_prompt)):
        capsys.readouterr()
        run(
            workdirs,
            tmp_path / name,
            "--prompt",
            prompt,
            "--num_samples",
            str(ROWS),
            "--seed",
            seed,
            models=models,
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0] == (
            f"warning: the prompt is {count} tokens, more than the {tokenizer.max_text_tokens} the prior's CLIP "
            "reads: the rest is cut"
        )
        assert len(err) == 2  # the warning (both models share one CLIP) and the summary
        cut = {"tokens": count, "kept": tokenizer.max_text_tokens}
        truncated = json.loads((tmp_path / name / "scores.json").read_text())["truncated"]
        assert truncated == {"prior": cut, "decoder": cut}
        written[name] = [(tmp_path / name / f"{i:03d}.png").read_bytes() for i in range(ROWS)]
    assert written["a"] == written["b"]
    assert all(x != y for x, y in zip(written["a"], written["c"]))


def test_fidelity_report_has_the_dalle_reports_keys(workdirs, models, clip, tmp_path, capsys):
    out = tmp_path / "fid.json"
    argv = [
        "--model",
        "unclip",
        "--prior_workdir",
        workdirs["prior"],
        "--decoder_workdir",
        workdirs["decoder"],
    ]
    argv += ["--clip_workdir", workdirs["clip"], "--split", "test_unseen", "--num_prompts", "2"]
    argv += ["--num_samples", "2", "--cond_scale", "3", "--batch_size", str(ROWS), "--workers", "1"]
    report = evaluate_fidelity.main(argv + STEPS + ["--out", str(out)], models=models, clip=clip)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report_layout(report) == FIDELITY_REPORT_LAYOUT
    assert set(report) - set(FIDELITY_REPORT_LAYOUT["top"]) == MODEL_KEYS["unclip"]
    assert (report["model"], report["cond_scale"], report["prior_scale"], report["steps"]) == (
        "unclip",
        3.0,
        1.0,
        2,
    )
    for setting, scale in (("guided", 3.0), ("unguided", 1.0)):
        nums = report["fidelity"][setting]
        assert nums["cond_scale"] == scale
        assert all(0.0 <= nums[k] <= 1.0 for k in ("first", "mean", "clip_best", "any"))
        assert report["timing"][setting]["images"] == 4
    assert len(report["prompts"]) == 2 and len(report["prompts"][0]["guided"]) == 2
    assert report["headline"]["metric"] == "clip_best" and report["headline"]["target"] == 0.6
    assert "caption fidelity, test_unseen: 2 prompts x 2 samples" in capsys.readouterr().out


def test_help_documents_the_flags():
    text = " ".join(generate.build_parser().format_help().split())
    for flag in ("--prior_workdir", "--decoder_workdir", "--upsampler_workdir", "--prompt", "--prompts_file"):
        assert flag in text
    for flag in ("--num_samples", "--top_k_rerank", "--clip_workdir", "--batch_size", "--seed", "--out_dir"):
        assert flag in text
    assert "--prior_scale PRIOR_SCALE the prior's classifier-free guidance" in text
    assert "--decoder_scale DECODER_SCALE the decoder's classifier-free guidance" in text
    assert "--sampler {ddpm,ddim,dpmpp} the decoder's sampler" in text
    assert "--steps STEPS the decoder's sampling steps" in text
    assert "--prior_steps PRIOR_STEPS the prior's sampling steps" in text
    assert "embeddings.npy" in generate.__doc__
    text = " ".join(evaluate_fidelity.build_parser().format_help().split())
    assert "--model {dalle,unclip}" in text
    for flag in (
        "--prior_workdir",
        "--decoder_workdir",
        "--upsampler_workdir",
        "--prior_scale",
        "--prior_steps",
    ):
        assert flag in text
    assert "unclip: the decoder's" in text  # what --cond_scale guides


def edited_copy(src, dst, section, key, value):
    """A copy of a workdir's config.json alone, one value changed: the stack is checked on
    config files before any params load."""
    os.makedirs(dst)
    config = json.loads(open(os.path.join(src, "config.json")).read())
    config[section][key] = value
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return str(dst)


def test_stack_and_guidance_checks(workdirs, tmp_path):
    wide = edited_copy(workdirs["prior"], tmp_path / "wide", "model", "clip_dim", 16)
    with pytest.raises(
        ValueError, match="the prior draws 16-wide CLIP embeddings .* the decoder reads 8-wide"
    ):
        read_configs(wide, workdirs["decoder"])
    prior, decoder, _ = read_configs(workdirs["prior"], workdirs["decoder"])
    assert check_stack(prior, decoder) == []
    # Guidance needs the null condition trained: the decoder's embedding and caption both dropped.
    decoder.model.clip_dropout = 0.0
    check_guidance(decoder, 1.0, "decoder", ("clip_dropout", "caption_dropout"))
    with pytest.raises(ValueError, match="guidance at 3 needs a decoder trained with clip_dropout > 0"):
        check_guidance(decoder, 3.0, "decoder", ("clip_dropout", "caption_dropout"))
    prior.clip_step = 7
    assert check_stack(prior, decoder) == [
        f"the prior was trained on CLIP {workdirs['clip']} at step 7 and the decoder on {workdirs['clip']} "
        "at step 0: the decoder reads the prior's embeddings as its own"
    ]


def bad_inputs(workdirs, tmp_path):
    """(name, argv without --out_dir, what the error says, whether the models are loaded already)."""
    (tmp_path / "empty.txt").write_text("\n\n")
    small = edited_copy(workdirs["upsampler"], tmp_path / "small_up", "model", "low_res_size", 4)
    wide = edited_copy(workdirs["prior"], tmp_path / "wide_prior", "model", "clip_dim", 16)
    prior, decoder, clip = workdirs["prior"], workdirs["decoder"], workdirs["clip"]
    one = ["--prompt", PROMPT]
    return [
        ("prompt and file", one + ["--prompts_file", "x.txt"], "give --prompt or --prompts_file, not both"),
        ("no prompt", [], "give --prompt or --prompts_file"),
        ("empty prompts file", ["--prompts_file", str(tmp_path / "empty.txt")], "holds no prompts"),
        ("rerank without CLIP", one + ["--top_k_rerank", "2"], "--top_k_rerank needs --clip_workdir"),
        (
            "rerank more than sampled",
            one + ["--num_samples", "4", "--top_k_rerank", "5", "--clip_workdir", clip],
            "--top_k_rerank must be in [1, --num_samples=4], got 5",
        ),
        ("negative prior scale", one + ["--prior_scale", "-1"], "--prior_scale must be >= 0"),
        ("negative decoder scale", one + ["--decoder_scale", "-0.5"], "--decoder_scale must be >= 0"),
        ("no steps", one + ["--steps", "0"], "--steps must be >= 1, got 0"),
        ("no prior steps", one + ["--prior_steps", "0"], "--prior_steps must be >= 1, got 0"),
        ("too many steps", one + ["--steps", "5000"], "the decoder's steps must be in [1, 1000]"),
        ("unknown sampler", one + ["--sampler", "euler"], "argument --sampler: invalid choice: 'euler'"),
        ("negative seed", one + ["--seed", "-1"], "--seed must be >= 0"),
        ("missing CLIP", one + ["--clip_workdir", str(tmp_path / "nope")], "--clip_workdir not found"),
        (
            "upsampler of another size",
            one + ["--upsampler_workdir", small],
            "the upsampler takes 4x4 images but the decoder draws 8x8",
        ),
        (
            "a decoder as the prior",
            one + ["--prior_workdir", decoder],
            "holds an unCLIP decoder workdir, not an unCLIP prior workdir",
        ),
        (
            "a prior as the decoder",
            one + ["--decoder_workdir", prior],
            "holds an unCLIP prior workdir, not an unCLIP decoder workdir",
        ),
        ("missing prior", one + ["--prior_workdir", str(tmp_path / "nope")], "--prior_workdir not found"),
        ("another CLIP's width", one + ["--prior_workdir", wide], "the prior draws 16-wide CLIP embeddings"),
    ]


def test_each_bad_input_is_one_error_line_and_writes_nothing(workdirs, models, tmp_path, capsys):
    decoder = workdirs["decoder"]
    for name, extra, says in bad_inputs(workdirs, tmp_path):
        out = tmp_path / "out"
        # Workdir flags given again replace the defaults (argparse keeps the last); those runs load
        # nothing, as the configs fail first.
        preloaded = (
            {} if any(a.endswith("_workdir") and a != "--clip_workdir" for a in extra) else {"models": models}
        )
        with pytest.raises(SystemExit) as exit_info:
            run(workdirs, out, *extra, **preloaded)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2, name
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], (name, lines)
        assert not out.exists(), name
    report = ["--out", str(tmp_path / "f.json")]
    unclip = ["--model", "unclip", "--prior_workdir", workdirs["prior"]]
    for argv, says in (
        (unclip + report, "--model unclip needs --decoder_workdir"),
        (unclip + ["--decoder_workdir", decoder, "--top_p", "0.7"] + report, "--top_p is for --model dalle"),
        (
            ["--workdir", workdirs["prior"], "--prior_scale", "2"] + report,
            "--prior_scale is for --model unclip",
        ),
        (unclip + ["--decoder_workdir", decoder, "--cond_scale", "-1"] + report, "--cond_scale must be >= 0"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            evaluate_fidelity.main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1 and says in lines[0], (argv, lines)
        assert not (tmp_path / "f.json").exists()
