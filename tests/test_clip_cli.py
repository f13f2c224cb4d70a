"""classify / embed / evaluate commands on a saved tiny random CLIP and a directory of PNGs."""

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import numpy as np
import pytest
from PIL import Image

from clip_jax import classify, embed, evaluate as ev
from clip_jax import model as clip_model
from core_jax.data.image_ops import clip_normalize, resize_and_crop

SIZE = 16


def tiny_config():
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
    config = clip_config(model, text_config(merges_file="", vocab_size=256 + 64 + 2 + 64, context_length=16))
    config.eval = ev.eval_config()
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir as a converter writes it: config.json + a step-0 params checkpoint + tokenizer."""
    import flax.linen as nn
    from core_jax.checkpoint import save_params
    from core_jax.text import tokenizer_from_config

    wd = str(tmp_path_factory.mktemp("clip_wd"))
    config = tiny_config()
    module = clip_model.clip_from_config(config)
    abstract = jax.eval_shape(lambda k: clip_model.init_params(module, k), jax.random.key(0))
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: (rng.normal(size=s.shape) * 0.2).astype(np.float32), nn.meta.unbox(abstract)
    )
    source = config.data.source  # shapes: '' train_source means the shapes captions
    tokenizer_from_config(config.text, wd, data_source=source)  # trains WORKDIR/tokenizer
    save_params(wd, config, params)
    return wd, Reference(module, params, tokenizer_from_config(config.text, wd, data_source=source))


class Reference:
    """Embeddings straight through the model (CLIP-normalised pixels), no CLI code involved."""

    def __init__(self, module, params, tokenizer):
        self.params, self.tokenizer = params, tokenizer
        self._image = jax.jit(lambda p, x: clip_model.encode_image(module, p, x))
        self._text = jax.jit(lambda p, t: clip_model.encode_text(module, p, t))

    def images(self, images):
        x = np.stack([clip_normalize(resize_and_crop(i, SIZE)) for i in images])
        return np.asarray(self._image(self.params, x))

    def texts(self, texts):
        return np.asarray(self._text(self.params, self.tokenizer.encode(texts)))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    images = {
        "a_exact.png": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
        "b_wide.png": rng.integers(0, 256, (24, 40, 3), dtype=np.uint8),
        "c_gray.png": rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8),
    }
    for name, img in images.items():
        Image.fromarray(img).save(d / name)
    (d / "d_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (d / "notes.txt").write_text("not an image")
    rgb = {k: (np.repeat(v[..., None], 3, -1) if v.ndim == 2 else v) for k, v in images.items()}
    return str(d), rgb


def test_classify_scores_every_readable_image(workdir, image_dir, tmp_path, capsys):
    wd, ref = workdir
    d, images = image_dir
    classes = ["red circle", "blue square", "green triangle"]
    templates = ["a {}", "a photo of a {}."]
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n\n")
    (tmp_path / "templates.txt").write_text("\n".join(templates))
    out = tmp_path / "pred.json"
    classify.main(
        [
            "--workdir",
            wd,
            "--input_dir",
            d,
            "--classnames_file",
            str(tmp_path / "classes.txt"),
            "--templates_file",
            str(tmp_path / "templates.txt"),
            "--out",
            str(out),
            "--batch_size",
            "2",
        ]
    )  # 3 images: a full and a partial batch
    pred = json.loads(out.read_text())
    assert sorted(pred) == sorted(images)  # the broken PNG and the .txt are not predictions
    assert "skipping d_broken.png" in capsys.readouterr().err
    names = sorted(images)
    img_emb = ref.images([images[n] for n in names])
    txt_emb = ref.texts([t.format(c) for c in classes for t in templates])
    w = txt_emb.reshape(3, 2, -1).mean(1)
    w /= np.linalg.norm(w, axis=-1, keepdims=True)
    logits = 100 * img_emb @ w.T
    want = np.exp(logits - logits.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    for name, p in zip(names, want):
        got = pred[name]
        np.testing.assert_allclose([got["probs"][c] for c in classes], p, atol=1e-4)
        assert got["label"] == classes[int(np.argmax(p))]
        assert sum(got["probs"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize("case", ["empty_classnames", "empty_dir", "missing_dir", "duplicate_class"])
def test_classify_bad_input_exits_2(workdir, image_dir, tmp_path, capsys, case):
    wd = workdir[0]
    classes = tmp_path / "classes.txt"
    classes.write_text(
        "" if case == "empty_classnames" else "cat\ndog\ncat\n" if case == "duplicate_class" else "cat\ndog\n"
    )
    input_dir = image_dir[0]
    if case == "empty_dir":
        input_dir = str(tmp_path / "empty")
        os.makedirs(input_dir)
    elif case == "missing_dir":
        input_dir = str(tmp_path / "nope")
    with pytest.raises(SystemExit) as e:
        classify.main(
            [
                "--workdir",
                wd,
                "--input_dir",
                input_dir,
                "--classnames_file",
                str(classes),
                "--out",
                str(tmp_path / "p.json"),
            ]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert {
        "empty_classnames": "is empty",
        "empty_dir": "no image files",
        "missing_dir": "not found",
        "duplicate_class": "more than once",
    }[case] in err
    assert not (tmp_path / "p.json").exists()


def test_embed_writes_normalised_embeddings_without_resampling(workdir, image_dir, tmp_path):
    wd, ref = workdir
    d, images = image_dir
    (tmp_path / "texts.txt").write_text("a red circle in the center\n\nnaïve café\n")
    out = tmp_path / "emb.npz"
    embed.main(
        ["--workdir", wd, "--input_dir", d, "--texts_file", str(tmp_path / "texts.txt"), "--out", str(out)]
    )
    z = np.load(out)
    assert list(z["image_files"]) == sorted(images)
    assert list(z["texts"]) == ["a red circle in the center", "naïve café"]
    assert z["image_embeddings"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z["image_embeddings"], axis=-1), 1, atol=1e-5)
    want = ref.images([images[n] for n in sorted(images)])
    np.testing.assert_allclose(z["image_embeddings"], want, atol=1e-5)
    np.testing.assert_allclose(z["text_embeddings"], ref.texts(list(z["texts"])), atol=1e-5)
    # The 16x16 image went in untouched: its embedding is that of its own normalised pixels.
    exact = ref._image(ref.params, np.stack([clip_normalize(images["a_exact.png"])] * 3))
    np.testing.assert_allclose(z["image_embeddings"][0], np.asarray(exact)[0], atol=1e-5)


def test_embed_texts_only_and_needs_an_input(workdir, tmp_path, capsys):
    wd = workdir[0]
    (tmp_path / "t.txt").write_text("one\ntwo\n")
    embed.main(["--workdir", wd, "--texts_file", str(tmp_path / "t.txt"), "--out", str(tmp_path / "t.npz")])
    assert sorted(np.load(tmp_path / "t.npz").files) == ["text_embeddings", "texts"]
    with pytest.raises(SystemExit) as e:
        embed.main(["--workdir", wd, "--out", str(tmp_path / "x.npz")])
    assert e.value.code == 2 and "--input_dir" in capsys.readouterr().err


def test_evaluate_cli_tfds_imagenet_and_shapes_retrieval(workdir, tmp_path, capsys, monkeypatch):
    """The command end to end: TFDS imagenet2012 (mock data, offline, no TensorFlow) zero-shot with
    the shipped class names, and retrieval on the shapes suite, from one saved workdir."""
    import tempfile
    import tensorflow_datasets as tfds

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # TFDS leaves empty temp dirs behind
    wd = workdir[0]
    out = tmp_path / "results.json"
    with tfds.testing.mock_data(num_examples=10):
        ev.main(
            [
                "--workdir",
                wd,
                "--out",
                str(out),
                "--config.eval.zeroshot_source=tfds",
                "--config.eval.zeroshot_split=validation",
                "--config.eval.templates=photo",
                "--config.eval.batch_size=8",
                "--config.data.min_image_side=1",
                "--config.eval.retrieval_split=test_seen",
                "--config.eval.max_examples=10",
            ]
        )
    results = json.loads(out.read_text())
    assert results["zeroshot/num_examples"] == 10
    assert 0 <= results["zeroshot/top1"] <= results["zeroshot/top5"] <= 1
    assert results["retrieval/num_images"] == 10 and results["retrieval/num_texts"] == 10
    assert 0 <= results["retrieval/i2t_r1"] <= results["retrieval/i2t_r10"] <= 1
    assert "1000 classes x 1 templates" in capsys.readouterr().err


def test_evaluate_cli_shapes_test_ood_prints_the_per_class_table(workdir, tmp_path, capsys):
    from core_jax.data.shapes import CLASS_NAMES, ShapesSource

    out = tmp_path / "ood.json"
    args = ["--workdir", workdir[0], "--out", str(out), "--config.eval.zeroshot_split=test_ood"]
    ev.main(args + ["--config.eval.max_examples=12", "--config.eval.batch_size=8"])
    captured = capsys.readouterr()
    printed = json.loads(captured.out.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    source = ShapesSource("test_ood", one_object_only=True)
    counts = np.bincount([source[i]["label"] for i in range(12)], minlength=len(CLASS_NAMES))
    per_class = printed["zeroshot/per_class"]
    assert {name: r["count"] for name, r in per_class.items()} == {
        CLASS_NAMES[c]: int(n) for c, n in enumerate(counts) if n
    }
    assert printed["zeroshot/min_class_top1"] == min(r["top1"] for r in per_class.values())
    assert printed["zeroshot/num_examples"] == 12
    # stderr: the summary, then one line per class with images, worst top-1 first.
    err = captured.err.splitlines()
    start = next(i for i, line in enumerate(err) if line.startswith("zeroshot per class, worst first"))
    assert err[start + 1].split() == ["top1", "count", "class"]
    rows = [line.split(maxsplit=2) for line in err[start + 2 : start + 2 + len(per_class)]]
    assert [float(r[0]) for r in rows] == sorted(float(r[0]) for r in rows)
    assert {r[2]: int(r[1]) for r in rows} == {n: r["count"] for n, r in per_class.items()}
    assert any("zeroshot shapes:test_ood: 18 classes" in line for line in err)


def test_evaluate_cli_rejects_unknown_keys(workdir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--workdir", workdir[0], "--config.eval.templatez=photo"])
    assert e.value.code == 2 and "unknown key 'templatez'" in capsys.readouterr().err


def test_evaluate_cli_rejects_a_split_the_shapes_suite_lacks(workdir, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--workdir", workdir[0], "--config.eval.zeroshot_split=test_odd"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: config.eval.zeroshot_split='test_odd' is not a shapes split")
    assert "'test_ood'" in err[0]
