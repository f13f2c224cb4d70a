"""Bad input never stops training: each case is skipped, counted by reason, and resume stays exact."""

import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from core_jax.data import NoUsableExamples, SkipExample, default_data_config, image_ops, make_iterator
from core_jax.data import decode


def encode(arr, fmt="PNG", mode=None, **kw):
    img = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb(seed=0, h=32, w=32):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_with_header_size(width, height):
    """A valid tiny PNG whose IHDR claims width x height: decoding it would fail or eat RAM."""
    data = bytearray(encode(rgb(h=8, w=8)))
    ihdr = bytearray(data[12:29])  # b'IHDR' + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, payload in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def skip_reason(fn, *args, **kw):
    with pytest.raises(SkipExample) as e:
        fn(*args, **kw)
    return e.value.reason


def test_decode_rejects_bad_images():
    jpeg = encode(rgb(), "JPEG")
    assert skip_reason(decode.decode_image, b"") == "empty_file"
    assert skip_reason(decode.decode_image, b"not an image at all") == "corrupt_image"
    assert skip_reason(decode.decode_image, jpeg[: len(jpeg) // 2]) == "corrupt_image"
    assert skip_reason(decode.decode_image, encode(rgb(h=1, w=1))) == "too_small"
    assert skip_reason(decode.decode_image, encode(rgb(h=7, w=32))) == "too_small"
    assert decode.decode_image(encode(rgb(h=8, w=32))).shape == (8, 32, 3)
    # Header checks: neither image has pixel data to match its claimed size, so any decode
    # attempt would report corrupt_image instead.
    assert skip_reason(decode.decode_image, png_with_header_size(20000, 20000)) == "too_large"
    assert skip_reason(decode.decode_image, png_with_header_size(10000, 10001)) == "too_large"
    assert skip_reason(decode.decode_image, png_with_header_size(100, 100), max_pixels=50 * 50) == "too_large"


def test_decode_converts_every_mode_to_rgb():
    a = rgb()
    assert np.array_equal(decode.decode_image(encode(a)), a)
    gray = decode.decode_image(encode(a, mode="L"))
    assert gray.shape == (32, 32, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    cmyk = decode.decode_image(encode(a, "JPEG", mode="CMYK"))
    assert cmyk.shape == (32, 32, 3) and cmyk.dtype == np.uint8
    pal = decode.decode_image(encode(a, mode="P"))
    assert pal.shape == (32, 32, 3)
    # RGBA composites on black: alpha 0 -> black, alpha 255 -> unchanged.
    rgba = np.concatenate([a, np.zeros((32, 32, 1), np.uint8)], -1)
    rgba[:16, :, 3] = 255
    out = decode.decode_image(encode(rgba))
    assert np.array_equal(out[:16], a[:16]) and not out[16:].any()
    # Palette with a transparent index, and gray+alpha.
    p = Image.fromarray(a).convert("P")
    buf = io.BytesIO()
    p.save(buf, format="PNG", transparency=int(np.asarray(p)[0, 0]))
    assert decode.decode_image(buf.getvalue())[0, 0].tolist() == [0, 0, 0]
    la = decode.decode_image(encode(rgba, mode="LA"))
    assert la.shape == (32, 32, 3) and not la[16:].any()
    # 16-bit grayscale PNG keeps its top 8 bits instead of saturating.
    g16 = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64
    buf = io.BytesIO()
    Image.fromarray(g16).save(buf, format="PNG")
    out = decode.decode_image(buf.getvalue())
    assert np.array_equal(out[..., 0], (g16 >> 8).astype(np.uint8))
    # Arrays as TFDS yields them.
    assert decode.check_array_image(a[..., :1]).shape == (32, 32, 3)
    assert skip_reason(decode.check_array_image, a[:4]) == "too_small"


def test_decode_text_and_json():
    assert decode.decode_text(b"  a red circle \n") == "a red circle"
    assert skip_reason(decode.decode_text, b"\xff\xfe caption") == "non_utf8"
    assert skip_reason(decode.decode_text, "bad \udcff") == "non_utf8"  # csv surrogateescape
    assert skip_reason(decode.decode_text, b"   ") == "empty_caption"
    assert skip_reason(decode.decode_text, None) == "missing_caption"
    assert skip_reason(decode.parse_json_object, b"{not json") == "bad_json"
    assert skip_reason(decode.parse_json_object, b"[1, 2]") == "bad_json"
    assert decode.parse_json_object(b'{"caption": "x"}') == {"caption": "x"}


def test_image_ops():
    a = rgb(h=32, w=48)
    out = image_ops.resize_and_crop(a, 32)
    assert out.shape == (32, 32, 3) and np.array_equal(out, a[:, 8:40])  # crop only, no resample
    sq = rgb(h=16, w=16)
    assert image_ops.resize_and_crop(sq, 16) is sq
    assert image_ops.resize_and_crop(a, 16).shape == (16, 16, 3)
    assert image_ops.resize_and_crop(rgb(h=9, w=20), 24).shape == (24, 24, 3)  # upsampling
    crops = {image_ops.resize_and_crop(a, 32, True, np.random.default_rng(s)).tobytes() for s in range(20)}
    assert len(crops) > 1
    flips = [image_ops.maybe_flip(a, np.random.default_rng(s)) for s in range(20)]
    assert any(f is a for f in flips) and any(np.array_equal(f, a[:, ::-1]) for f in flips)
    x = image_ops.clip_normalize(np.full((2, 2, 3), 255, np.uint8))
    np.testing.assert_allclose(x[0, 0], (1 - image_ops.CLIP_MEAN) / image_ops.CLIP_STD, rtol=1e-6)
    m = image_ops.dvae_map_pixels(np.array([[[0, 255, 128]]], np.uint8))
    np.testing.assert_allclose(m[0, 0, :2], [0.1, 0.9], rtol=1e-6)
    assert m.dtype == np.float32
    np.testing.assert_allclose(
        image_ops.unmap_pixels(m), image_ops.to_float01(np.array([[[0, 255, 128]]], np.uint8)), atol=1e-6
    )
    assert image_ops.unmap_pixels(np.array([0.0, 1.0])).tolist() == [0.0, 1.0]


def _example_fn(raw, rng):
    return {"image": raw["image"].astype(np.int32).sum((0, 1)), "key": np.array(raw["key"])}


def _bad_shard_samples():
    good = encode(rgb(), "JPEG")
    cases = {
        "corrupt_image": {"jpg": b"\x89PNG garbage", "txt": b"x"},
        "empty_file": {"jpg": b"", "txt": b"x"},
        "too_small": {"png": encode(rgb(h=1, w=1)), "txt": b"x"},
        "too_large": {"png": png_with_header_size(20000, 20000), "txt": b"x"},
        "non_utf8": {"jpg": good, "txt": b"\xff\xfe\xfd"},
        "empty_caption": {"jpg": good, "txt": b"  "},
        "missing_caption": {"jpg": good},
        "bad_json": {"jpg": good, "json": b"{caption: oops"},
        "missing_image": {"txt": b"caption without image"},
    }
    samples = []
    for i, files in enumerate(cases.values()):
        samples.append((f"{i:04d}", files))
        samples.append(
            (
                f"{i:04d}g",
                {"jpg": encode(rgb(i), "JPEG"), "json": json.dumps({"caption": f"good {i}"}).encode()},
            )
        )
    return samples, set(cases)


def test_webdataset_skips_each_bad_case_and_resumes_exactly(tmp_path):
    samples, reasons = _bad_shard_samples()
    write_shard(tmp_path / "a.tar", samples[:10])
    write_shard(tmp_path / "b.tar", samples[10:])
    cfg = default_data_config()
    cfg.update(dict(source="webdataset", urls=f"{tmp_path}/{{a,b}}.tar", shuffle_buffer=4))
    kw = dict(global_batch_size=3, seed=3, example_fn=_example_fn, process_index=0, process_count=1)
    it = make_iterator(cfg, "validation", train=False, **kw)
    keys = [k for b in it for k, m in zip(b["key"].tolist(), b["_mask"]) if m]
    assert sorted(keys) == sorted(f"{int(i >= 5)}/{i:04d}g" for i in range(9))
    assert it.skipped == {r: 1 for r in reasons}
    it = make_iterator(cfg, "train", **kw)
    for _ in range(5):  # well into the second epoch, mid shuffle window
        next(it)
    assert sum(it.skipped.values()) >= 9
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    it2 = make_iterator(cfg, "train", **kw)
    it2.set_state(state)
    for want in expected:
        got = next(it2)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    assert it2.skipped == it.skipped


def test_corrupt_shard_is_counted_and_iteration_goes_on(tmp_path):
    samples, _ = _bad_shard_samples()
    good = [s for s in samples if s[0].endswith("g")]
    write_shard(tmp_path / "ok.tar", good[:4])
    write_shard(tmp_path / "cut.tar", good[4:])
    data = (tmp_path / "cut.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:3000])  # truncated inside the 2nd/3rd member
    cfg = default_data_config()
    cfg.update(dict(source="webdataset", urls=f"{tmp_path}/ok.tar,{tmp_path}/cut.tar"))
    it = make_iterator(
        cfg,
        "validation",
        global_batch_size=4,
        seed=0,
        example_fn=_example_fn,
        train=False,
        process_index=0,
        process_count=1,
    )
    rows = sum(int(b["_mask"].sum()) for b in it)
    assert it.skipped == {"corrupt_shard": 1} and 4 <= rows < 9


def test_folder_bad_rows(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(4):
        (tmp_path / "img" / f"{i}.png").write_bytes(encode(rgb(i)))
    (tmp_path / "img" / "empty.png").write_bytes(b"")
    (tmp_path / "img" / "trunc.jpg").write_bytes(encode(rgb(), "JPEG")[:300])
    lines = [json.dumps({"path": f"img/{i}.png", "caption": f"c{i}"}) for i in range(4)]
    lines += [
        json.dumps({"path": "img/empty.png", "caption": "e"}),
        json.dumps({"path": "img/trunc.jpg", "caption": "t"}),
        json.dumps({"path": "img/missing.png", "caption": "m"}),
        json.dumps({"path": "img/0.png", "caption": None}),
        json.dumps({"path": "img/0.png", "caption": 7}),
        "{broken json",
    ]
    (tmp_path / "index.jsonl").write_text("\n".join(lines) + "\n")
    cfg = default_data_config()
    cfg.update(dict(source="folder", data_dir=str(tmp_path)))
    it = make_iterator(
        cfg,
        "train",
        global_batch_size=2,
        seed=0,
        example_fn=_example_fn,
        train=False,
        process_index=0,
        process_count=1,
    )
    assert sum(int(b["_mask"].sum()) for b in it) == 4
    assert it.skipped == {
        "empty_file": 1,
        "corrupt_image": 1,
        "missing_image": 1,
        "missing_caption": 1,
        "bad_json": 2,
    }


def test_folder_csv_non_utf8_caption(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(rgb()))
    (tmp_path / "index.csv").write_bytes(b"file,text\na.png,caf\xe9 latin-1\na.png,fine\n")
    cfg = default_data_config()
    cfg.update(dict(source="folder", index_file=str(tmp_path / "index.csv")))
    it = make_iterator(
        cfg,
        "train",
        global_batch_size=1,
        seed=0,
        example_fn=_example_fn,
        train=False,
        process_index=0,
        process_count=1,
    )
    assert [b["_mask"].tolist() for b in it] == [[True], [False]]
    assert it.skipped == {"non_utf8": 1}


def test_no_usable_examples_is_an_error_not_a_hang(tmp_path):
    write_shard(tmp_path / "bad.tar", [(f"{i}", {"jpg": b"junk", "txt": b"x"}) for i in range(3)])
    cfg = default_data_config()
    cfg.update(dict(source="webdataset", urls=str(tmp_path / "bad.tar")))
    kw = dict(global_batch_size=2, seed=0, example_fn=_example_fn, process_index=0, process_count=1)
    with pytest.raises(NoUsableExamples, match="bad.tar"):
        next(make_iterator(cfg, "train", **kw))
    with pytest.raises(NoUsableExamples, match="bad.tar"):
        next(make_iterator(cfg, "train", train=False, **kw))


def test_missing_paths_fail_before_training(tmp_path):
    cfg = default_data_config()
    kw = dict(global_batch_size=2, seed=0, example_fn=_example_fn, process_index=0, process_count=1)
    write_shard(tmp_path / "s-0.tar", [("0", {"jpg": encode(rgb(), "JPEG"), "txt": b"x"})])
    for urls, named in [
        (f"{tmp_path}/s-{{0..1}}.tar", "s-1.tar"),
        (f"{tmp_path}/nothing-*.tar", "nothing-*.tar"),
        (f"{tmp_path}/s-0.tar,{tmp_path}/other.tar", "other.tar"),
    ]:
        cfg.update(dict(source="webdataset", urls=urls))
        with pytest.raises(FileNotFoundError, match=named.replace("*", r"\*")):
            make_iterator(cfg, "train", **kw)
    cfg.update(dict(source="folder", index_file=str(tmp_path / "nope.csv")))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        make_iterator(cfg, "train", **kw)


def test_random_resized_crop_keeps_the_papers_share_of_the_image():
    """DALL-E's dVAE augmentation (resize_range (9/8, 12/8)): the 64 px crop covers 64/t of the
    square's side for t uniform in [72, 96], so between 2/3 and 8/9 of it."""
    ramp = np.tile(np.linspace(0, 255, 400, dtype=np.float32), (400, 1)).round().astype(np.uint8)
    img = np.repeat(ramp[:, :, None], 3, axis=-1)
    spans = []
    for seed in range(40):
        out = image_ops.resize_and_crop(
            img, 64, random_crop=True, rng=np.random.default_rng(seed), resize_range=(9 / 8, 12 / 8)
        )
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
        cols = out[:, :, 0].astype(np.float32).mean(0)
        spans.append((cols[-1] - cols[0]) / 255 * 64 / 63)  # share of the side the crop covers
    assert 2 / 3 - 0.02 < min(spans) < 0.72 and 0.84 < max(spans) < 8 / 9 + 0.02, (min(spans), max(spans))
    # (1, 1) is the plain resize + random crop; eval (random_crop=False) ignores the range.
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    np.testing.assert_array_equal(
        image_ops.resize_and_crop(img, 64, random_crop=True, rng=rng_a, resize_range=(1.0, 1.0)),
        image_ops.resize_and_crop(img, 64, random_crop=True, rng=rng_b),
    )
    np.testing.assert_array_equal(
        image_ops.resize_and_crop(img, 64, resize_range=(1.125, 1.5)), image_ops.resize_and_crop(img, 64)
    )
    # Non-square and smaller-than-crop inputs still give the crop size.
    assert image_ops.random_resized_crop(img[:, :300], 256, (1.125, 1.5)).shape == (256, 256, 3)
    assert image_ops.random_resized_crop(img[:40, :50], 64, (1.125, 1.5)).shape == (64, 64, 3)


@pytest.mark.parametrize("bad", [(0.5, 1.0), (1.5, 1.2), (1.0,)])
def test_random_resize_range_is_validated(bad):
    from core_jax.config import ConfigError, base_config, validate

    c = base_config()
    c.data.random_resize_range = bad
    with pytest.raises(ConfigError, match="random_resize_range"):
        validate(c, 1)
