"""Zero-shot classification: exact top-k on encoders whose embeddings the test controls."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from clip_jax import evaluate as ev
from clip_jax import zeroshot
from clip_jax.imagenet_classes import IMAGENET_CLASSNAMES, OPENAI_TEMPLATES, SUBSET7_TEMPLATES
from core_jax.data.shapes import UNSEEN_PAIRS


def id_image(i: int, size: int = 8) -> np.ndarray:
    """An image whose first pixel spells its row index (the fake encoders read it back)."""
    img = np.zeros((size, size, 3), np.uint8)
    img[0, 0, 0], img[0, 0, 1] = i // 256, i % 256
    return img


class TableEncoder:
    """Image i embeds as image_table[i]; a text embeds as text_fn(text). Normalises both."""

    image_size = 8

    def __init__(self, image_table, text_fn):
        self.image_table, self.text_fn = np.asarray(image_table, np.float32), text_fn
        self.texts_seen = []

    def embed_images(self, images):
        images = np.asarray(images)
        ids = images[:, 0, 0, 0].astype(int) * 256 + images[:, 0, 0, 1]
        x = self.image_table[ids]
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def embed_texts(self, texts):
        self.texts_seen.extend(texts)
        x = np.stack([np.asarray(self.text_fn(t), np.float32) for t in texts])
        return x / np.linalg.norm(x, axis=-1, keepdims=True)


class ShardedTableEncoder(TableEncoder):
    """Same embeddings, but batches live as arrays split over 8 devices (the trainer's layout)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
        self.data_parallel = len(jax.devices())

    def put(self, rows):
        return jax.device_put(np.asarray(rows), NamedSharding(self.mesh, P("data")))

    def embed_images(self, images):
        return self.put(super().embed_images(images))


def ranked_fixture(num_classes=10, num_images=37, seed=0):
    """Class c's text is e_c; image i scores classes so that its label sits at rank ranks[i]."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(num_classes, size=num_images)
    ranks = rng.integers(num_classes, size=num_images)
    table = np.zeros((num_images, num_classes), np.float32)
    for i in range(num_images):
        others = [c for c in rng.permutation(num_classes) if c != labels[i]]
        order = others[: ranks[i]] + [labels[i]] + others[ranks[i] :]
        table[i, order] = 1.0 - 0.05 * np.arange(num_classes)
    names = [f"class{c}" for c in range(num_classes)]

    def text_fn(text):
        c = int(text.split("class")[1].split()[0].rstrip("."))
        return np.eye(num_classes)[c]

    return labels, ranks, table, names, text_fn


def batches_of(labels, batch_size, process_index=0, process_count=1):
    load = lambda i: {"image": id_image(i), "label": np.int32(labels[i])}  # noqa: E731
    return ev.padded_batches(
        len(labels), load, batch_size, process_index=process_index, process_count=process_count
    )


def test_shipped_imagenet_lists():
    assert len(IMAGENET_CLASSNAMES) == 1000
    assert len(OPENAI_TEMPLATES) == 80 and len(set(OPENAI_TEMPLATES)) == 80
    assert SUBSET7_TEMPLATES == (
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
    )
    assert set(SUBSET7_TEMPLATES) <= set(OPENAI_TEMPLATES)
    assert all(t.count("{}") == 1 for t in OPENAI_TEMPLATES)
    # Spot checks against the standard label order (sorted WordNet ids).
    for index, name in [
        (0, "tench"),
        (1, "goldfish"),
        (207, "Golden Retriever"),
        (281, "tabby cat"),
        (409, "analog clock"),
        (817, "sports car"),
        (954, "banana"),
        (999, "toilet paper"),
    ]:
        assert IMAGENET_CLASSNAMES[index] == name


@pytest.mark.parametrize("batch_size", [4, 8, 64])
def test_topk_is_exact_and_padding_is_masked(batch_size):
    labels, ranks, table, names, text_fn = ranked_fixture()
    enc = TableEncoder(table, text_fn)
    weights = zeroshot.class_embeddings(enc, names, ["a photo of a {}."])
    result = zeroshot.evaluate_batches(enc, batches_of(labels, batch_size), weights)
    # 37 images: not a multiple of any batch size here, so the last batch is padded with
    # copies of real rows; each image must still count exactly once.
    assert result["num_examples"] == 37
    assert result["top1"] == pytest.approx(np.mean(ranks == 0))
    assert result["top5"] == pytest.approx(np.mean(ranks < 5))
    assert 0 < result["top1"] < result["top5"] < 1


def test_padded_rows_never_count_even_with_wrong_labels():
    labels, ranks, table, names, text_fn = ranked_fixture(num_images=5)
    enc = TableEncoder(table, text_fn)
    weights = zeroshot.class_embeddings(enc, names, ["{}"])
    good = {
        "image": np.stack([id_image(i) for i in range(5)] + [id_image(0)] * 3),
        "label": np.concatenate([labels, [labels[0]] * 3]).astype(np.int32),
        "_mask": np.array([True] * 5 + [False] * 3),
    }
    result = zeroshot.evaluate_batches(enc, [good], weights)
    assert result["num_examples"] == 5
    assert result["top1"] == pytest.approx(np.mean(ranks == 0))


def expected_per_class(labels, ranks, names):
    return {
        names[c]: {"top1": float(np.mean(ranks[labels == c] == 0)), "count": int(np.sum(labels == c))}
        for c in range(len(names))
        if np.any(labels == c)
    }


@pytest.mark.parametrize("batch_size,sharded", [(4, False), (64, False), (16, True)])
def test_per_class_top1_is_exact_and_padding_is_masked(batch_size, sharded):
    # 10 classes over 37 images: per class 0 to 10 images and top-1 anywhere in [0, 1].
    labels, ranks, table, names, text_fn = ranked_fixture(num_images=37, seed=3)
    enc = (ShardedTableEncoder if sharded else TableEncoder)(table, text_fn)
    weights = zeroshot.class_embeddings(enc, names, ["{}"])
    result = zeroshot.evaluate_batches(enc, batches_of(labels, batch_size), weights, classnames=names)
    want = expected_per_class(labels, ranks, names)
    assert result["per_class"] == want  # exact: both are hits / count in float64
    assert sum(r["count"] for r in result["per_class"].values()) == result["num_examples"] == 37
    top1s = [r["top1"] for r in want.values()]
    assert min(top1s) < result["top1"] < max(top1s)  # the fixture is not uniform across classes
    # Without names the table is keyed by label.
    unnamed = zeroshot.evaluate_batches(enc, batches_of(labels, batch_size), weights)
    assert unnamed["per_class"] == {n[len("class") :]: v for n, v in want.items()}


def test_per_class_skips_padded_rows_and_empty_classes():
    names = ["class0", "class1", "class2", "class3"]
    predicted, labels = [0, 1, 1, 1, 0, 2], [0, 0, 1, 1, 1, 2]  # class 3 has no real image
    enc = TableEncoder(np.eye(4)[predicted], lambda t: np.eye(4)[int(t[-1])])
    weights = zeroshot.class_embeddings(enc, names, ["{}"])
    batch = {  # padded rows (image 0, predicted 0) claim class 3 and class 0, and must not count
        "image": np.stack([id_image(i) for i in range(6)] + [id_image(0)] * 2),
        "label": np.array(labels + [3, 0], np.int32),
        "_mask": np.array([True] * 6 + [False] * 2),
    }
    result = zeroshot.evaluate_batches(enc, [batch], weights, classnames=names)
    assert result["per_class"] == {
        "class0": {"top1": 1 / 2, "count": 2},
        "class1": {"top1": 2 / 3, "count": 3},
        "class2": {"top1": 1.0, "count": 1},
    }


def test_per_class_names_repeated_in_the_list_stay_apart():
    table = zeroshot.per_class_top1(np.array([1, 0, 2]), np.array([2, 0, 4]), ["missile", "tench", "missile"])
    assert table == {"missile (0)": {"top1": 0.5, "count": 2}, "missile (2)": {"top1": 0.5, "count": 4}}
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        zeroshot.per_class_top1(np.zeros(3), np.ones(3), ["a", "b"])


def test_per_class_table_lists_the_worst_class_first():
    table = {"red circle": {"top1": 1.0, "count": 3}, "blue square": {"top1": 0.25, "count": 4}}
    table["green triangle"] = {"top1": 0.5, "count": 2}
    lines = zeroshot.format_per_class(table).splitlines()
    assert lines[0].split() == ["top1", "count", "class"]
    assert [line.split(maxsplit=2) for line in lines[1:]] == [
        ["0.2500", "4", "blue square"],
        ["0.5000", "2", "green triangle"],
        ["1.0000", "3", "red circle"],
    ]


def test_max_examples_caps_the_count():
    labels, ranks, table, names, text_fn = ranked_fixture()
    enc = TableEncoder(table, text_fn)
    weights = zeroshot.class_embeddings(enc, names, ["{}"])
    result = zeroshot.evaluate_batches(enc, batches_of(labels, 8), weights, max_examples=11)
    assert result["num_examples"] == 11
    assert result["top1"] == pytest.approx(np.mean(ranks[:11] == 0))


def test_sharded_batches_give_the_same_counts():
    labels, ranks, table, names, text_fn = ranked_fixture()
    enc = ShardedTableEncoder(table, text_fn)
    weights = zeroshot.class_embeddings(enc, names, ["{}"])
    result = zeroshot.evaluate_batches(enc, batches_of(labels, 16), weights)
    assert result["num_examples"] == 37
    assert result["top1"] == pytest.approx(np.mean(ranks == 0))
    assert result["top5"] == pytest.approx(np.mean(ranks < 5))


def test_ties_go_to_the_lower_class_index_like_torch_topk():
    # ImageNet lists "missile" twice (657, 744): identical weights; OpenAI's protocol credits 657.
    weights = np.eye(4, dtype=np.float32)[[0, 1, 1, 3]]
    emb = np.eye(4, dtype=np.float32)[[1, 1]]
    hits = zeroshot.topk_hits(emb, weights, np.array([1, 2]), np.array([True, True]), ks=(1, 2))
    assert int(hits["top1"]) == 1 and int(hits["top2"]) == 2 and int(hits["count"]) == 2


def test_class_weights_average_normalised_templates_then_renormalise():
    rng = np.random.default_rng(1)
    vectors = {}

    def text_fn(text):  # a fixed random, deliberately unnormalised vector per prompt
        return vectors.setdefault(text, rng.normal(size=6) * rng.uniform(0.5, 3.0))

    enc = TableEncoder(np.zeros((1, 6)), text_fn)
    names, templates = ["cat", "dog", "hot dog"], ["a {}.", "itap of a {}.", "art of the {}."]
    weights = zeroshot.class_embeddings(enc, names, templates)
    assert weights.shape == (3, 6)
    for c, name in enumerate(names):
        raw = [vectors[t.format(name)] for t in templates]
        units = [v / np.linalg.norm(v) for v in raw]
        mean = np.mean(units, axis=0)
        np.testing.assert_allclose(weights[c], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
    assert enc.texts_seen[:3] == ["a cat.", "itap of a cat.", "art of the cat."]


def test_resolve_classnames_and_templates(tmp_path):
    wordnet = [f"n{i:08d}" for i in range(1000)]
    assert zeroshot.resolve_classnames("", wordnet) == list(IMAGENET_CLASSNAMES)
    assert zeroshot.resolve_classnames("", ["sea_lion", "dog"]) == ["sea lion", "dog"]
    assert zeroshot.resolve_classnames("imagenet") == list(IMAGENET_CLASSNAMES)
    f = tmp_path / "names.txt"
    f.write_text("red circle\n\n  blue square \n")
    assert zeroshot.resolve_classnames(str(f)) == ["red circle", "blue square"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="empty"):
        zeroshot.resolve_classnames(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="has none"):
        zeroshot.resolve_classnames("", None)
    assert zeroshot.resolve_templates("subset7") == list(SUBSET7_TEMPLATES)
    assert zeroshot.resolve_templates("shapes")[0] == "a {} in the top left"
    (tmp_path / "bad.txt").write_text("a photo of a thing\n")
    with pytest.raises(ValueError, match="exactly once"):
        zeroshot.resolve_templates(str(tmp_path / "bad.txt"))
    with pytest.raises(ValueError, match="neither"):
        zeroshot.resolve_templates("openai81")


def caption_class_one_hots(texts):
    """One-hot of the shapes class each prompt ("a {colour} {shape} in ...") names: a text tower
    that reads every caption right."""
    from core_jax.data.shapes import CLASS_NAMES

    eye = np.eye(len(CLASS_NAMES))
    return np.stack([eye[next(i for i, c in enumerate(CLASS_NAMES) if f"a {c} in" in t)] for t in texts])


def test_shapes_zeroshot_with_an_oracle_encoder_is_perfect():
    """Labels, class names and templates line up: an encoder that knows each image's true class
    (by looking the rendered pixels up) and each prompt's class (by its name) scores 100%."""
    from core_jax.data.shapes import CLASS_NAMES, ShapesSource

    n = 40
    source = ShapesSource("test_unseen", one_object_only=True)
    truth = {source[i]["image"].tobytes(): source[i]["label"] for i in range(n)}
    eye = np.eye(len(CLASS_NAMES))

    class Oracle:
        image_size = 64

        def embed_images(self, images):
            return np.stack([eye[truth[im.tobytes()]] for im in np.asarray(images)])

        def embed_texts(self, texts):
            return caption_class_one_hots(texts)

    config = ev.with_eval_defaults(_minimal_config())
    config.eval.zeroshot_source, config.eval.zeroshot_split = "shapes", "test_unseen"
    config.eval.max_examples, config.eval.batch_size = n, 16
    result = zeroshot.run_zeroshot(config, Oracle(), log=lambda m: None)
    per_class = result.pop("per_class")
    assert result == {"top1": 1.0, "top5": 1.0, "num_examples": n, "min_class_top1": 1.0}
    # test_unseen holds the 4 held-out pairs only: the table has just those classes.
    held_out = {f"{c} {s}" for c, s in UNSEEN_PAIRS}
    assert set(per_class) == held_out and sum(r["count"] for r in per_class.values()) == n
    assert all(r["top1"] == 1.0 for r in per_class.values())


def test_shapes_min_class_top1_is_the_worst_class():
    """An encoder right on every class but one, which it always takes for another: the overall
    top-1 stays high, the worst class scores 0 (test_ood, one-object scenes)."""
    from core_jax.data.shapes import CLASS_NAMES, ShapesSource

    n = 48
    source = ShapesSource("test_ood", one_object_only=True)
    truth = {source[i]["image"].tobytes(): source[i]["label"] for i in range(n)}
    counts = np.bincount(list(truth.values()), minlength=len(CLASS_NAMES))
    confused = int(np.argmax(counts))  # the most frequent class, so its share is known to be > 0
    eye = np.eye(len(CLASS_NAMES))

    class Confused:
        image_size = 64

        def embed_images(self, images):
            labels = [truth[im.tobytes()] for im in np.asarray(images)]
            return np.stack([eye[(c + 1) % len(eye) if c == confused else c] for c in labels])

        def embed_texts(self, texts):
            return caption_class_one_hots(texts)

    config = ev.with_eval_defaults(_minimal_config())
    config.eval.zeroshot_source, config.eval.zeroshot_split = "shapes", "test_ood"
    config.eval.max_examples, config.eval.batch_size = n, 16
    logged = []
    result = zeroshot.run_zeroshot(config, Confused(), log=logged.append)
    assert result["top1"] == pytest.approx(1 - counts[confused] / n)
    assert result["min_class_top1"] == 0.0
    assert result["per_class"][CLASS_NAMES[confused]] == {"top1": 0.0, "count": int(counts[confused])}
    table = logged[-1].splitlines()
    assert table[0].startswith(f"zeroshot per class, worst first ({np.sum(counts > 0)} of 18 classes")
    assert table[2].split(maxsplit=2) == ["0.0000", str(counts[confused]), CLASS_NAMES[confused]]


def test_default_templates_imagenet_80_shapes_own():
    """TFDS (ImageNet) zero-shot defaults to the paper's 80 (open_clip's OPENAI_IMAGENET_TEMPLATES,
    the notebook's order); the 7 stay selectable; shapes keeps its position templates."""
    from clip_jax.defaults import vit_config

    e = ev.with_eval_defaults(_minimal_config()).eval
    e.zeroshot_source = "tfds"
    templates = zeroshot.resolve_templates(zeroshot.default_templates(e))
    assert templates == list(OPENAI_TEMPLATES) and len(templates) == 80
    assert templates[:2] == ["a bad photo of a {}.", "a photo of many {}."]
    assert templates[-2:] == ["a photo of a small {}.", "a tattoo of the {}."]
    assert zeroshot.default_templates(vit_config("ViT-B-32").eval) == "openai80"
    e.templates = "subset7"
    assert zeroshot.resolve_templates(zeroshot.default_templates(e)) == list(SUBSET7_TEMPLATES)
    e.templates, e.zeroshot_source = "", "shapes"
    assert zeroshot.resolve_templates(zeroshot.default_templates(e)) == [
        f"a {{}} in the {p}" for p in ("top left", "top right", "bottom left", "bottom right", "center")
    ]


def _minimal_config():
    import ml_collections

    return ml_collections.ConfigDict({"data": {"source": "shapes"}})


def test_eval_config_overrides():
    config = ev.with_eval_defaults(_minimal_config())
    ev.apply_overrides(
        config,
        ["--config.eval.max_examples=7", "--config.eval.templates=openai80", "--config.data.source=tfds"],
    )
    assert config.eval.max_examples == 7 and config.eval.templates == "openai80"
    assert config.data.source == "tfds"
    with pytest.raises(ValueError, match="unknown key 'max_exampels'"):
        ev.apply_overrides(config, ["--config.eval.max_exampels=3"])
    with pytest.raises(ValueError, match="expected int"):
        ev.apply_overrides(config, ["--config.eval.batch_size=big"])
    config.eval.zeroshot_source = "cifar"
    with pytest.raises(ValueError, match="zeroshot_source"):
        zeroshot.check_eval_config(config)
    config.eval.zeroshot_source, config.eval.zeroshot_split = "shapes", "validation"
    with pytest.raises(ValueError, match="'validation' is not a shapes split; use one of"):
        zeroshot.check_eval_config(config)
    config.eval.zeroshot_split = "test_ood"
    zeroshot.check_eval_config(config)


def test_tfds_imagenet_path_with_an_oracle_encoder(tmp_path, monkeypatch):
    """TFDS imagenet2012 (mock data, no TensorFlow): labels reach the scorer in order, WordNet ids
    become the cleaned names, padded/skipped rows are not counted."""
    import tempfile
    import tensorflow_datasets as tfds

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # TFDS leaves empty temp dirs behind

    n, size = 13, 16
    with tfds.testing.mock_data(num_examples=n):
        raw = tfds.data_source("imagenet2012", split="validation")
        truth = {ev.sized_image(raw[i]["image"], size).tobytes(): int(raw[i]["label"]) for i in range(n)}
        prompt_class = {
            t.format(c): IMAGENET_CLASSNAMES.index(c) for c in IMAGENET_CLASSNAMES for t in SUBSET7_TEMPLATES
        }
        eye = np.eye(1000, dtype=np.float32)

        class Oracle:
            image_size = size

            def embed_images(self, images):  # padding rows (zeros) embed as class 0
                return np.stack([eye[truth.get(im.tobytes(), 0)] for im in np.asarray(images)])

            def embed_texts(self, texts):  # a prompt -> its class name's first index
                return eye[[prompt_class[t] for t in texts]]

        config = ev.with_eval_defaults(_minimal_config())
        config.data.min_image_side = 1  # mock images can be 1 pixel thin
        config.eval.zeroshot_source, config.eval.zeroshot_split = "tfds", "validation"
        config.eval.templates, config.eval.batch_size = "subset7", 8
        result = zeroshot.run_zeroshot(config, Oracle(), log=lambda m: None)
    labels = list(truth.values())
    # A label whose cleaned name occurs earlier in the list ("missile" 744 -> 657) loses the tie.
    expected = np.mean([IMAGENET_CLASSNAMES.index(IMAGENET_CLASSNAMES[l]) == l for l in labels])
    assert result["num_examples"] == n
    assert result["top1"] == pytest.approx(expected) and expected > 0.5


# ----------------------------------------------------------------------------------------------
# A tiny random CLIP through the sharded params encoder (what the trainer evaluator uses).


def tiny_clip_config():
    from clip_jax.defaults import clip_config, model_config, text_config

    model = model_config(
        name="tiny",
        image_size=16,
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
def tiny_clip(tmp_path_factory):
    from clip_jax import model as clip_model

    workdir = str(tmp_path_factory.mktemp("tiny_clip"))
    config = tiny_clip_config()
    module = clip_model.clip_from_config(config)
    return config, module, random_params(module), workdir


def random_params(module, seed=0):
    """Random values in the model's param shapes, without compiling an init (slow on 2 cores)."""
    import flax.linen as nn
    from clip_jax import model as clip_model

    abstract = jax.eval_shape(lambda k: clip_model.init_params(module, k), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: (rng.normal(size=s.shape) * 0.2).astype(np.float32), nn.meta.unbox(abstract)
    )


def test_params_encoder_matches_unsharded_model(tiny_clip):
    from clip_jax import model as clip_model
    from core_jax.data.image_ops import clip_normalize

    config, module, params, workdir = tiny_clip
    enc = ev.ParamsEncoder(config, params, workdir)
    assert enc.data_parallel == 8  # replicated params, batch split over all 8 devices
    images = np.random.default_rng(0).integers(0, 256, size=(16, 16, 16, 3), dtype=np.uint8)
    got = enc.embed_images(images)
    assert len(got.sharding.device_set) == 8
    encode = jax.jit(lambda p, x: clip_model.encode_image(module, p, x))
    want = encode(params, clip_normalize(images))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    texts = ["a red circle in the top left", "a blue square", "x"] * 3
    want_t = jax.jit(lambda p, t: clip_model.encode_text(module, p, t))(params, enc.tokenizer.encode(texts))
    np.testing.assert_allclose(enc.embed_texts(texts), np.asarray(want_t), atol=2e-5)


def test_evaluators_on_params_sharded_like_the_trainer(tiny_clip):
    """Params laid out as the trainer holds them (fsdp + tensor on a 2x2x2 mesh): the evaluators
    embed on that mesh, batches split over data*fsdp = 4."""
    import flax.linen as nn
    from clip_jax import model as clip_model
    from clip_jax.retrieval import RetrievalEvaluator
    from core_jax import sharding

    config, module, params, workdir = tiny_clip
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    boxed = jax.eval_shape(lambda k: clip_model.init_params(module, k), jax.random.key(0))
    params = jax.device_put(params, nn.meta.unbox(sharding.tree_shardings(mesh, boxed)))
    config = ev.with_eval_defaults(config)
    config.eval.max_examples, config.eval.batch_size = 21, 10  # 10 -> 12: last batch padded
    config.eval.retrieval_split = "test_seen"
    with jax.set_mesh(mesh):
        zs = zeroshot.ZeroShotEvaluator(config, workdir)
        result = zs.fn(params, 0)
        assert zs.name == "zeroshot" and result["num_examples"] == 21
        assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
        # Scalars only, as the trainer writes them; the worst class bounds the mean from below.
        assert set(result) == {"top1", "top5", "num_examples", "min_class_top1"}
        assert 0.0 <= result["min_class_top1"] <= result["top1"]
        rt = RetrievalEvaluator(config, workdir)
        result = rt.fn(params, 0)
    assert rt.name == "retrieval"
    assert result["num_images"] == 21 and result["num_texts"] == 21
    assert 0.0 <= result["i2t_r1"] <= result["i2t_r5"] <= result["i2t_r10"] <= 1.0
