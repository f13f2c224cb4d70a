"""`python -m dalle_jax.unclip.vary` and `bench.bench_unclip` on tiny random workdirs: the promised
files for variations (with an upsampler), interpolation, text diffs and inpainting; inpainting
keeps every pixel outside the box; a text diff starts from the image's own reconstruction and
moves its embedding toward the text diff by growing angles; settings.json; every bad input is one
`error:` line, exit 2, nothing written; the bench's JSON in --quick mode.

The models are random (a CLIP of width 16 on 16x16 images, a one-level U-Net of width 8 drawing
8x8 images, an 8 -> 16 upsampler): the cost is compiling the samplers, a few seconds each.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bench import bench_unclip, clip_position, run_all
from core_jax.data import shapes
from dalle_jax.unclip import uses, vary
from dalle_jax.unclip.api import Decoder
from tests.workdirs import (
    tiny_clip_workdir,
    tiny_dvae_workdir,
    tiny_unclip_decoder_workdir,
    tiny_unclip_upsampler_workdir,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = "3"
OLD_CAPTION, NEW_CAPTION = "a red circle in the top left", "a blue circle in the top left"


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    clip = tiny_clip_workdir(str(root / "clip"), image_size=16)
    return {
        "clip": clip,
        "decoder": tiny_unclip_decoder_workdir(str(root / "decoder"), clip, image_size=8),
        "upsampler": tiny_unclip_upsampler_workdir(str(root / "upsampler"), low_res_size=8, factor=2),
        "dvae": tiny_dvae_workdir(str(root / "dvae")),
    }


@pytest.fixture(scope="module")
def decoder(workdirs):
    """One loaded decoder for the text diff tests, so each sampler is traced once."""
    return Decoder.load(workdirs["decoder"])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """a.png 20x24 (resized and centre-cropped to the CLIP's 16, then to the decoder's 8) and
    b.png 8x8 (the decoder's own size, taken as it is)."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    images = {
        "a": rng.integers(0, 256, (20, 24, 3), dtype=np.uint8),
        "b": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
    }
    for name, image in images.items():
        Image.fromarray(image).save(folder / f"{name}.png")
    return str(folder), images


def read_png(path):
    return np.asarray(Image.open(path))


def vary_args(workdirs, input_dir, out_dir, *extra):
    return [
        "--decoder_workdir",
        workdirs["decoder"],
        "--input_dir",
        input_dir,
        "--out_dir",
        str(out_dir),
        "--num_samples",
        "2",
        "--steps",
        STEPS,
        *extra,
    ]


def test_variations_with_the_upsampler_write_the_promised_files(tmp_path, workdirs, inputs):
    input_dir, _ = inputs
    out = tmp_path / "out"
    settings = vary.main(
        vary_args(workdirs, input_dir, out, "--upsampler_workdir", workdirs["upsampler"], "--seed", "3")
    )
    assert sorted(os.listdir(out)) == ["a", "b", "settings.json"]
    for name in ("a", "b"):
        assert sorted(os.listdir(out / name)) == ["000.png", "001.png", "grid.png"]
        samples = [read_png(out / name / f) for f in ("000.png", "001.png")]
        assert all(s.shape == (16, 16, 3) for s in samples)  # the upsampler's size
        assert not np.array_equal(*samples)  # eta > 0: the two samples differ
        # grid: the input then the two samples, 16 px each with 2 px gaps.
        assert read_png(out / name / "grid.png").shape == (2 + 2 * 18, 2 + 2 * 18, 3)
    written = json.loads((out / "settings.json").read_text())
    assert written == json.loads(json.dumps(settings))
    expected = {
        "mode": "variations",
        "sampler": "ddim",
        "steps": 3,
        "cond_scale": 1.0,
        "eta": uses.VARIATION_ETA,
        "seed": 3,
        "num_samples": 2,
        "inverted_noise": True,
        "decoder_size": 8,
        "output_size": 16,
        "decoder_step": 0,
        "clip_step": 0,
        "upsampler_step": 0,
        "seeds": {"a": 3, "b": 3},
    }
    assert {k: written[k] for k in expected} == expected
    for key in ("decoder_workdir", "clip_workdir", "upsampler_workdir"):
        model = key.split("_")[0]
        assert written[key] == os.path.abspath(workdirs[model])
    assert [(i["name"], i["width"], i["height"]) for i in written["inputs"]] == [("a", 24, 20), ("b", 8, 8)]


def test_interpolation_writes_frames_and_a_strip(tmp_path, workdirs, inputs):
    input_dir, _ = inputs
    out = tmp_path / "out"
    settings = vary.main(
        vary_args(workdirs, input_dir, out, "--interpolate", "a.png", "b.png", "--frames", "3")
    )
    assert sorted(os.listdir(out)) == ["interpolate", "settings.json"]
    assert sorted(os.listdir(out / "interpolate")) == ["000.png", "001.png", "002.png", "strip.png"]
    # The strip is one row: a, three frames, b.
    assert read_png(out / "interpolate" / "strip.png").shape == (2 + 10, 2 + 5 * 10, 3)
    assert settings["mode"] == "interpolate" and settings["frames"] == 3 and settings["eta"] == 0.0
    assert [i["name"] for i in settings["inputs"]] == ["a", "b"]


def test_inpainting_keeps_every_pixel_outside_the_box(tmp_path, workdirs, inputs):
    input_dir, images = inputs
    out = tmp_path / "out"
    settings = vary.main(vary_args(workdirs, input_dir, out, "--inpaint_box", "2,1,6,5"))
    assert settings["mode"] == "inpaint" and settings["inpaint_box"] == [2, 1, 6, 5]
    decoder = Decoder.load(workdirs["decoder"])
    for name in ("a", "b"):
        assert sorted(os.listdir(out / name)) == ["000.png", "001.png", "grid.png"]
        redraw = uses.box_mask(images[name].shape[:2], (2, 1, 6, 5), decoder)
        kept = uses.decoder_view(decoder, images[name][None])[0]
        for f in ("000.png", "001.png"):
            sample = read_png(out / name / f)
            np.testing.assert_array_equal(sample[~redraw], kept[~redraw])
            assert not np.array_equal(sample[redraw], kept[redraw])
    # b is at the decoder's size: the kept pixels are the input's own, and the box is x 2..5, y 1..4.
    np.testing.assert_array_equal(uses.decoder_view(decoder, images["b"][None])[0], images["b"])
    expected = np.zeros((8, 8), bool)
    expected[1:5, 2:6] = True
    np.testing.assert_array_equal(uses.box_mask((8, 8), (2, 1, 6, 5), decoder), expected)
    assert settings["inpaint_pixels_redrawn"] == {
        "a": int(uses.box_mask((20, 24), (2, 1, 6, 5), decoder).sum()),
        "b": 16,
    }


def text_diff_frames(decoder, image, **kwargs):
    """The CLI's text diff of `image` (OLD -> NEW, 3 frames to strength 0.5) from Python."""
    return uses.text_diff(
        decoder, image, OLD_CAPTION, NEW_CAPTION, strength=0.5, frames=3, steps=int(STEPS), **kwargs
    )


def test_text_diff_frame_0_is_the_inverted_noise_reconstruction(decoder, inputs):
    _, images = inputs
    image = images["a"]
    frames = text_diff_frames(decoder, image)
    assert frames.shape == (3, 8, 8, 3) and frames.dtype == np.uint8
    # With the new caption: the image inverted and redrawn under its own embedding and that caption.
    z = decoder.embed_images(image[None])
    captions = [NEW_CAPTION] * 3
    x_T = decoder.invert(image[None], z, steps=int(STEPS), captions=captions[:1])
    redrawn = decoder.decode(
        np.repeat(z, 3, axis=0),
        captions,
        x_T=np.repeat(x_T, 3, axis=0),
        sampler="ddim",
        steps=3,
        eta=0.0,
        cond_scale=1.0,
    )
    np.testing.assert_array_equal(frames[0], redrawn[0])
    assert not np.array_equal(frames[-1], frames[0])  # the edit moves the image
    # Without a caption frame 0 is exactly a variation at eta 0 from the inverted noise.
    uncaptioned = text_diff_frames(decoder, image, decoder_caption=False)
    variation = uses.variations(decoder, image[None], 3, steps=int(STEPS), eta=0.0)[0]
    np.testing.assert_array_equal(uncaptioned[0], variation[0])


def test_text_diff_slerps_toward_the_caption_difference_by_growing_angles(decoder, inputs, monkeypatch):
    _, images = inputs
    text = decoder.text_embeddings([OLD_CAPTION, NEW_CAPTION])
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, rtol=1e-5)  # unit CLIP embeddings
    direction = (text[1] - text[0]) / np.linalg.norm(text[1] - text[0])
    np.testing.assert_allclose(
        uses.caption_direction(decoder, OLD_CAPTION, NEW_CAPTION), direction, rtol=1e-5
    )
    decoded = {}
    decode = decoder.decode

    def recording_decode(z, captions=None, **kwargs):
        decoded.update(z=np.asarray(z), captions=captions)
        return decode(z, captions, **kwargs)

    monkeypatch.setattr(decoder, "decode", recording_decode)
    text_diff_frames(decoder, images["a"])
    z_i = decoder.embed_images(images["a"][None])[0]
    z = decoded["z"]
    assert decoded["captions"] == [NEW_CAPTION] * 3
    np.testing.assert_array_equal(z[0], z_i)  # theta 0 is the image's own embedding, bit for bit
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)

    def angle(a, b):
        return np.arccos(np.clip(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b), -1.0, 1.0))

    to_image = np.array([angle(row, z_i) for row in z])
    assert np.all(np.diff(to_image) > 0), to_image  # each frame further from the image
    # slerp: theta's share of the whole angle to the text diff (thetas 0, 0.25, 0.5).
    np.testing.assert_allclose(to_image, np.array([0.0, 0.25, 0.5]) * angle(z_i, direction), atol=1e-3)
    assert angle(z[-1], direction) < angle(z_i, direction)  # and closer to the text diff
    with pytest.raises(ValueError, match="same CLIP text embedding"):
        uses.text_diff_direction(text[0], text[0])
    with pytest.raises(ValueError, match="expected a unit CLIP embedding"):
        uses.text_diff_direction(2 * text[0], text[1])


def test_text_diff_writes_frames_a_strip_and_its_settings(tmp_path, workdirs, decoder, inputs):
    input_dir, images = inputs
    out = tmp_path / "out"
    extra = [
        "--text_diff",
        OLD_CAPTION,
        NEW_CAPTION,
        "--strength",
        "0.5",
        "--frames",
        "3",
        "--image",
        "a.png",
    ]
    settings = vary.main(vary_args(workdirs, input_dir, out, *extra), decoder=decoder)
    assert sorted(os.listdir(out)) == ["settings.json", "text_diff"]
    assert sorted(os.listdir(out / "text_diff")) == ["000.png", "001.png", "002.png", "strip.png"]
    # The strip is one row: the image, then three frames.
    assert read_png(out / "text_diff" / "strip.png").shape == (2 + 10, 2 + 4 * 10, 3)
    written = np.stack([read_png(out / "text_diff" / f"{i:03d}.png") for i in range(3)])
    np.testing.assert_array_equal(written, text_diff_frames(decoder, images["a"]))
    assert json.loads((out / "settings.json").read_text()) == json.loads(json.dumps(settings))
    expected = {
        "mode": "text_diff",
        "old_caption": OLD_CAPTION,
        "new_caption": NEW_CAPTION,
        "decoder_caption": NEW_CAPTION,
        "strength": 0.5,
        "frames": 3,
        "thetas": [0.0, 0.25, 0.5],
        "num_samples": None,
        "eta": 0.0,
        "inverted_noise": True,
        "files": {"text_diff": ["000.png", "001.png", "002.png"]},
    }
    assert {k: settings[k] for k in expected} == expected
    assert [(i["name"], i["width"], i["height"]) for i in settings["inputs"]] == [("a", 24, 20)]


def test_box_mask_follows_the_centre_crop(workdirs):
    """20x24 -> shorter side 16 (scale 0.8) -> 16x19, centre crop from x = 1 -> 8x8 (2 px each)."""
    decoder = Decoder.load(workdirs["decoder"])
    assert uses.box_mask((20, 24), (0, 0, 24, 20), decoder).all()
    # Input x 12..13 -> crop x 8.5..9.3 -> decoder column 4 only; y 0..5 -> rows 0..1.
    mask = uses.box_mask((20, 24), (12, 0, 13, 5), decoder)
    assert np.argwhere(mask).tolist() == [[0, 4], [1, 4]]
    with pytest.raises(ValueError, match="outside the centre square"):
        uses.box_mask((20, 24), (0, 0, 1, 20), decoder)  # the column the crop leaves out


def bad_input_cases(tmp_path, workdirs, inputs):
    input_dir, _ = inputs
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    base = dict(workdirs=workdirs, input_dir=input_dir)
    text_diff = ["--text_diff", OLD_CAPTION, NEW_CAPTION, "--image", "a.png"]
    return [
        ("missing input dir", dict(base, input_dir=str(tmp_path / "nope")), [], "--input_dir not found"),
        ("empty input dir", dict(base, input_dir=str(empty)), [], "holds no images"),
        ("unreadable image", dict(base, input_dir=str(broken)), [], "cannot read image"),
        (
            "a CLIP as the decoder",
            dict(base, workdirs=dict(workdirs, decoder=workdirs["clip"])),
            [],
            "holds a CLIP workdir, not an unCLIP decoder workdir",
        ),
        (
            "a dVAE as the decoder",
            dict(base, workdirs=dict(workdirs, decoder=workdirs["dvae"])),
            [],
            "holds a dVAE workdir, not an unCLIP decoder workdir",
        ),
        (
            "a decoder as the upsampler",
            base,
            ["--upsampler_workdir", workdirs["decoder"]],
            "not an unCLIP upsampler workdir",
        ),
        ("box outside the image", base, ["--inpaint_box", "0,0,9,9"], "outside"),  # b is 8x8
        ("empty box", base, ["--inpaint_box", "3,2,3,6"], "is empty"),
        ("box not four numbers", base, ["--inpaint_box", "1,2,3"], "four integers"),
        ("box in the cropped margin", base, ["--inpaint_box", "0,0,1,8"], "outside the centre square"),
        ("one frame", base, ["--interpolate", "a.png", "b.png", "--frames", "1"], "--frames must be >= 2"),
        ("missing interpolation end", base, ["--interpolate", "a.png", "c.png"], "c.png not found"),
        ("too many steps", base, ["--steps", "5000"], "--steps must be <="),
        ("eta with dpmpp", base, ["--sampler", "dpmpp", "--eta", "0.5"], "--eta is for --sampler ddim only"),
        ("strength above 1", base, text_diff + ["--strength", "1.5"], "--strength must be in (0, 1]"),
        ("strength 0", base, text_diff + ["--strength", "0"], "--strength must be in (0, 1]"),
        (
            "identical captions",
            base,
            ["--text_diff", OLD_CAPTION, OLD_CAPTION],
            "the two captions are the same",
        ),
        (
            "captions CLIP reads the same",
            base,
            ["--text_diff", OLD_CAPTION, OLD_CAPTION.upper(), "--image", "a.png"],
            "the same CLIP text embedding",
        ),
        ("empty caption", base, ["--text_diff", " ", NEW_CAPTION], "the old caption is empty"),
        ("text diff with one caption", base, ["--text_diff", OLD_CAPTION], "expected 2 arguments"),
        (
            "over-long caption",
            base,
            ["--text_diff", OLD_CAPTION, " and ".join([NEW_CAPTION] * 4), "--image", "a.png"],
            "tokens but the CLIP reads at most",
        ),
        ("text diff of two images", base, ["--text_diff", OLD_CAPTION, NEW_CAPTION], "name one with --image"),
        ("strength without a text diff", base, ["--strength", "0.5"], "--strength is for --text_diff only"),
        (
            "text diff and interpolation",
            base,
            text_diff + ["--interpolate", "a.png", "b.png"],
            "choose one of",
        ),
    ]


def test_each_bad_input_is_one_error_line_and_writes_nothing(tmp_path, workdirs, inputs, capsys):
    for name, where, extra, says in bad_input_cases(tmp_path, workdirs, inputs):
        out = tmp_path / "out"
        argv = vary_args(where["workdirs"], where["input_dir"], out, *extra)
        if "--steps" in extra:
            argv = argv[: argv.index("--steps")] + argv[argv.index("--steps") + 2 :]
        with pytest.raises(SystemExit) as exit_info:
            vary.main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2, name
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], (name, lines)
        assert not out.exists(), name


def test_the_command_line_fails_in_one_line(tmp_path, workdirs):
    env = dict(
        os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu"
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "dalle_jax.unclip.vary", "--decoder_workdir", workdirs["decoder"]]
        + ["--input_dir", str(tmp_path / "nope"), "--out_dir", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --input_dir not found: {tmp_path / 'nope'}"
    ]
    assert not out.exists()


def test_bench_quick_run_has_every_key(tmp_path, workdirs, monkeypatch):
    # Fewer settings than the bench's lists (each compiles a sampler; s = 3 is the ceiling's, on
    # as many rows, so it compiles nothing new); every part still runs.
    monkeypatch.setattr(bench_unclip, "VARIATION_ETAS", (uses.VARIATION_ETA,))
    monkeypatch.setattr(bench_unclip, "GUIDANCE_SCALES", (3.0,))
    monkeypatch.setattr(bench_unclip, "SAMPLER_ROWS", (("dpmpp", 20), ("ddpm", 1000)))
    out = tmp_path / "unclip.json"
    bench_unclip.main(
        ["--clip_workdir", workdirs["clip"], "--decoder_workdir", workdirs["decoder"], "--quick"]
        + ["--out", str(out), "--md", str(tmp_path / "unclip.md")]
    )
    result = json.loads(out.read_text())
    assert set(bench_unclip.PARTS) <= set(result) and result["size"] == "quick"
    ceiling = result["ceiling"]
    assert set(ceiling["splits"]) == {"test_seen", "test_unseen"}
    for row in ceiling["splits"].values():
        assert row["count"] == 4 and set(row["pass_rate"]) == {"all", "one_object", "two_object"}
        assert 0 <= row["colour_swap_rate"] <= 1 and 0 <= row["one_object_drawn_rate"] <= 1
    probe = result["position_probe"]
    assert (probe["train_scenes"], probe["test_scenes"]) == (16, 4)
    assert probe["probe_px"] >= 0 and probe["mean_centre_px"] > 0
    pl = result["placement"]
    assert pl["count"] == 2 and [r["t"] for r in pl["rows"]] == [999, 949, 899, 799]
    assert all(r["with_embedding_px"] >= 0 and r["null_px"] >= 0 and r["snr"] < 0.2 for r in pl["rows"])
    v = result["variations"]
    assert [r["eta"] for r in v["rows"]] == [uses.VARIATION_ETA]
    assert all(set(r) == {"eta", "pass_rate", "psnr_db", "default"} for r in v["rows"])
    assert [r["cond_scale"] for r in result["guidance"]["rows"]] == [3.0]
    assert all(r["diversity"] > 0 for r in result["guidance"]["rows"])
    rows = result["samplers"]["rows"]
    assert [r["setting"] for r in rows] == ["dpmpp 20", "ddpm 1000"]
    assert all(r["seconds_per_image"] > 0 for r in rows)
    td = result["text_diffs"]
    assert td["count"] == 2 and td["swaps"] == {"colour": 1, "shape": 1}
    assert [(r["strength"], r["decoder_caption"]) for r in td["rows"]] == [
        (0.25, "new"),
        (0.5, "new"),
        (0.5, "none"),
    ]
    rates = ("pass_rate", "pass_rate_colour", "pass_rate_shape", "theta0_pass_old", "clip_closer_to_new")
    rates += ("embedding_closer_to_new",)
    assert all(0 <= r[k] <= 1 for r in td["rows"] for k in rates)
    old, new = td["examples"][0]["old"], td["examples"][0]["new"]
    assert len(old.split()) == len(new.split()) and sum(a != b for a, b in zip(old.split(), new.split())) == 1
    assert all(result[p]["seconds"] > 0 for p in bench_unclip.PARTS)
    names = [t["name"] for t in result["targets"]]
    assert len(names) == 4 and all(t["met"] in (True, False) for t in result["targets"])
    assert (tmp_path / "unclip.md").read_text().startswith("### unCLIP on the shapes suite")
    assert run_all.section("unclip", result).startswith("###")


def test_the_suite_skips_the_bench_without_workdirs():
    res = run_all.run_one("unclip", "toy", None)
    assert res["targets"] == [] and "--unclip_decoder_workdir" in res["skipped"]
    assert run_all.section("unclip", res).startswith("### unCLIP")


def test_placement_centres_are_where_the_object_is():
    images = -np.ones((2, 8, 8, 3))
    images[0, 1:3, 5:7, 0] = 1.0  # a red 2x2 square: x 5..6, y 1..2
    images[1, 6, 2, :] = 0.5  # one grey pixel
    np.testing.assert_allclose(clip_position.brightness_centres(images), [[5.5, 1.5], [2.0, 6.0]], atol=1e-6)


def test_drawn_anywhere_ignores_the_place_but_not_colour_or_shape():
    """A scene's own image passes its caption and is drawn right; moved to the opposite quadrant
    it fails the caption yet is still drawn right; painted another palette colour it is not."""
    from core_jax.data import shapes
    from core_jax.data.shapes_checker import caption_fidelity

    scene = next(
        s
        for i in range(50)
        if (s := shapes.make_example("test_seen", i, 1, one_object_fraction=1.0))["position"] == "top left"
    )
    image = scene["image"]
    assert caption_fidelity(image, scene["caption"]) == 1.0 and bench_unclip.drawn_anywhere(image, scene)
    moved = np.roll(image, (image.shape[0] // 2, image.shape[1] // 2), axis=(0, 1))
    assert caption_fidelity(moved, scene["caption"]) == 0.0 and bench_unclip.drawn_anywhere(moved, scene)
    (obj,) = scene["objects"]
    other = next(colour for colour in shapes.COLOURS if colour != obj["colour"])
    recoloured = np.where(image.any(-1, keepdims=True), np.uint8(shapes.COLOURS[other]), image)
    assert bench_unclip.detect_objects(recoloured)[0]["colour"] == other
    assert not bench_unclip.drawn_anywhere(recoloured, scene)


class PositionOracle:
    """A fake CLIP whose image and text embeddings are one-hot in the scene's / caption's place
    (or, with `blind`, the same vector for every place)."""

    def __init__(self, blind: bool):
        self.blind = blind

    def embed_images(self, images):
        centres = clip_position.brightness_centres(images.astype(np.float32) / 127.5 - 1.0)
        out = np.zeros((len(images), 5))
        for row, (x, y) in zip(out, centres):
            near_centre = abs(x - 32) < 8 and abs(y - 32) < 8
            row[0 if self.blind else 4 if near_centre else (2 if y > 32 else 0) + (x > 32)] = 1.0
        return out

    def embed_texts(self, captions):
        index = [shapes.POSITIONS.index(shapes.parse_caption(c)["position"]) for c in captions]
        return np.eye(5)[[0 if self.blind else i for i in index]]


def test_position_caption_accuracy_tells_a_placing_clip_from_a_blind_one():
    assert clip_position.position_caption_accuracy(PositionOracle(blind=False), "test_seen", 20) == 1.0
    # A blind CLIP ties every caption; argmax takes the first, right only for "top left" scenes.
    blind = clip_position.position_caption_accuracy(PositionOracle(blind=True), "test_seen", 20)
    assert blind < 0.5
    probe = clip_position.position_probe(PositionOracle(blind=False).embed_images, 200, 40)
    assert probe["probe_px"] < 0.6 * probe["mean_centre_px"]


def test_clip_position_quick_run(tmp_path, workdirs, capsys):
    out = tmp_path / "position.json"
    rows = clip_position.main(["--clip_workdir", workdirs["clip"], "--quick", "--out", str(out)])
    saved = json.loads(out.read_text())["rows"]
    assert saved == json.loads(json.dumps(rows)) and len(rows) == 1
    assert all(0 <= rows[0][f"position_caption/{s}"] <= 1 for s in clip_position.CAPTION_SPLITS)
    assert rows[0]["probe"]["test_scenes"] == 4
    assert capsys.readouterr().out.startswith("| CLIP |")
    with pytest.raises(SystemExit) as e:
        clip_position.main(["--clip_workdir", str(tmp_path / "missing")])
    assert e.value.code == 2
