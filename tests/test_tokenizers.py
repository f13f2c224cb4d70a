"""Tests for core_jax.text: CLIP-format BPE loading, encoding layouts, training, config."""

import gzip
import json
import os
import pickle
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from core_jax.data import shapes
from core_jax.text import (
    BPETokenizer,
    bytes_to_unicode,
    clean_text,
    find_open_clip_merges,
    tokenizer_from_config,
    train_bpe,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A hand-written CLIP-layout file: no end_of_word= field, so all 256 word-final bytes exist.
# Ids: byte chars 0..255 ('!'..'~' first, so ASCII c -> ord(c) - 33), the same + '</w>'
# 256..511, merges 512.., then start, end.
TINY_MERGES = "#version: 0.2\nc a\nca t</w>\nt h\nth e</w>\n"
CA, CAT, TH, THE, START, END = 512, 513, 514, 515, 516, 517
TINY_VOCAB = 518


def byte_id(ch, final=False):
    return ord(ch) - 33 + (256 if final else 0)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "merges.txt"
    path.write_text(TINY_MERGES, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return BPETokenizer.from_merges(tiny_path, context_length=10)


@pytest.fixture(scope="module")
def shapes_merges(tmp_path_factory):
    return train_bpe(shapes.all_captions("train"), 512, str(tmp_path_factory.mktemp("shapes") / "merges.txt"))


def test_bytes_to_unicode_matches_clip_order():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert list(table)[:3] == [33, 34, 35] and table[ord("a")] == "a"
    assert table[32] == "Ġ" and table[0] == "Ā"  # the GPT-2/CLIP remapping of unprintables


def test_clean_text_like_clip():
    assert clean_text("  A  Photo\tOF\n a CAT.  ") == "a photo of a cat."
    assert clean_text("fish &amp;amp; chips") == "fish & chips"  # unescaped twice


def test_clean_text_ascii_fast_path_matches_ftfy():
    # clean_text skips ftfy and unescaping for printable ASCII without '&'; this checks that skip
    # against the full pipeline on random printable ASCII, quotes and backslashes included.
    ftfy = pytest.importorskip("ftfy")
    import html
    import random
    import string

    def full(text):
        return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()

    rng = random.Random(0)
    chars = [c for c in string.printable if c.isprintable() and c != "&"]
    texts = ["".join(rng.choice(chars) for _ in range(rng.randint(0, 30))) for _ in range(3000)]
    texts += ['It\'s a "cat"', "a `quoted' word", "C:\\path -- 100% <b>", "a red circle in the top left"]
    texts += ["caf\u00e9 &lt;3", "tab\there", "fish &amp; chips", "ï¬\x81sh"]  # take ftfy's path
    assert [clean_text(t) for t in texts] == [full(t) for t in texts]


def test_tiny_golden_ids(tiny):
    assert tiny.vocab_size == TINY_VOCAB == tiny.total_vocab_size
    assert (tiny.start_id, tiny.end_id) == (START, END)
    ids = tiny.encode(["The cat  sat."])
    sat = [byte_id("s"), byte_id("a"), byte_id("t", final=True)]
    want = [START, THE, CAT] + sat + [byte_id(".", final=True), END, 0, 0]
    np.testing.assert_array_equal(ids, np.array([want], np.int32))
    assert ids.dtype == np.int32 and ids.shape == (1, 10)


def test_tiny_golden_non_ascii(tiny):
    # 'é' is UTF-8 C3 A9; C3 lies in the '®'..'ÿ' block (ids 106..187), A9 in '¡'..'¬' (94..105).
    # The emoji's bytes F0 9F 99 82: F0 -> 106 + 66; 9F, 99, 82 are remapped bytes (128.. -> 222..).
    assert tiny.tokenize(["é"])[0] == [106 + 0xC3 - 174, 256 + 94 + 0xA9 - 161]
    assert tiny.tokenize(["🙂"])[0] == [
        106 + 0xF0 - 174,
        222 + 0x9F - 128,
        222 + 0x99 - 128,
        256 + 222 + 0x82 - 128,
    ]


def test_gzipped_file_and_max_merges(tiny_path, tmp_path, tiny):
    gz = tmp_path / "merges.txt.gz"
    gz.write_bytes(gzip.compress(TINY_MERGES.encode()))
    texts = ["the cat", "a theca"]
    np.testing.assert_array_equal(BPETokenizer.from_merges(str(gz), 10).encode(texts), tiny.encode(texts))
    two = BPETokenizer.from_merges(tiny_path, max_merges=2)
    assert two.vocab_size == 512 + 2 + 2
    assert two.tokenize(["the cat"])[0] == [byte_id("t"), byte_id("h"), byte_id("e", True), CAT]


def test_truncation_keeps_end_last(tiny_path):
    zeros = BPETokenizer.from_merges(tiny_path, context_length=4)
    np.testing.assert_array_equal(zeros.encode(["the cat sat on the mat"])[0], [START, THE, CAT, END])
    per = BPETokenizer.from_merges(tiny_path, context_length=3, pad_mode="per_position")
    np.testing.assert_array_equal(per.encode(["the cat sat on the mat"])[0], [THE, CAT, END])


def test_per_position_pads(tiny_path):
    tok = BPETokenizer.from_merges(tiny_path, context_length=6, pad_mode="per_position")
    assert tok.total_vocab_size == TINY_VOCAB + 6
    ids = tok.encode(["the cat", "", "the"])
    np.testing.assert_array_equal(ids[0], [THE, CAT, END, TINY_VOCAB + 3, TINY_VOCAB + 4, TINY_VOCAB + 5])
    assert ids[1, 0] == END and START not in ids
    for row in ids:
        pads = row[list(row).index(END) + 1 :]
        assert len(set(pads.tolist())) == len(pads)
        assert np.all(pads >= tok.vocab_size) and np.all(row < tok.total_vocab_size)
    assert tok.decode(ids[0]) == "the cat" and tok.decode_batch(ids) == ["the cat", "", "the"]


def test_round_trip_and_decode(tiny_path, tiny):
    long = BPETokenizer.from_merges(tiny_path, context_length=64)
    for text in ["A  Cat THE  cat", "Héllo   wörld 🙂 日本 the", ""]:
        assert long.decode(long.encode([text])[0]) == clean_text(text)
    # A str is a batch of one, not a sequence of characters.
    assert tiny.encode("the cat").shape == (1, 10)
    # Like CLIP, every word-final token decodes with a trailing space.
    assert tiny.decode(tiny.encode(["the cat."])[0]) == "the cat ."


def test_special_tokens_in_text(tiny):
    assert tiny.tokenize(["the<|endoftext|>"])[0] == [THE, END]


def test_pickle_round_trip(shapes_merges):
    tok = BPETokenizer.from_merges(shapes_merges, context_length=16, pad_mode="per_position")
    again = pickle.loads(pickle.dumps(tok))
    texts = ["a red circle above a blue square", "émoji 🙂"]
    np.testing.assert_array_equal(again.encode(texts), tok.encode(texts))


def test_shapes_bpe_is_compact(shapes_merges):
    tok = BPETokenizer.from_merges(shapes_merges, context_length=16, pad_mode="per_position")
    assert 258 < tok.vocab_size <= 512
    for split in shapes.SPLITS:
        captions = shapes.all_captions(split)
        lengths = [len(ids) for ids in tok.tokenize(captions)]
        assert max(lengths) + 1 <= 16, split  # + the end token
        ids = tok.encode(captions)
        assert ids.shape == (len(captions), 16) and ids.max() < tok.total_vocab_size
        assert [tok.decode(row) for row in ids] == [clean_text(c) for c in captions]


def test_trained_bpe_byte_fallback(shapes_merges):
    tok = BPETokenizer.from_merges(shapes_merges, context_length=64)
    texts = ["Ünïcödé zebra 🦓🙂 — 日本語 ok", "ß ø"]
    ids = tok.encode(texts)
    assert ids.max() < tok.vocab_size
    # Word-final bytes unseen in training share the plain byte's id: only spaces may be lost.
    for text, row in zip(texts, ids):
        assert tok.decode(row).replace(" ", "") == clean_text(text).replace(" ", "")


def test_train_bpe_vocab_size_limits(tmp_path):
    captions = ["alpha beta gamma delta", "beta gamma delta epsilon", "zeta eta theta"] * 20
    path = train_bpe(captions, 280, str(tmp_path / "m.txt"))
    tok = BPETokenizer.from_merges(path)
    assert tok.vocab_size == 280
    assert tok.decode(tok.encode(["alpha beta"])[0]) == "alpha beta"
    # 256 bytes + word-final 'a' and 'n' + start/end = 260: no room for any merge below that.
    assert BPETokenizer.from_merges(train_bpe(captions, 260, str(tmp_path / "min.txt"))).merges == []
    with pytest.raises(ValueError, match="too small"):
        train_bpe(captions, 259, str(tmp_path / "small.txt"))


def test_train_bpe_cli(tmp_path):
    out = tmp_path / "cli" / "merges.txt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "core_jax.text.train_bpe",
            "--source",
            "shapes",
            "--vocab_size",
            "512",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_text(encoding="utf-8").startswith("#version: 0.2")
    tok = BPETokenizer.from_merges(str(out), context_length=16)
    assert tok.decode(tok.encode(["a red circle in the top left"])[0]) == "a red circle in the top left"


def test_train_bpe_cli_captions_file(tmp_path):
    from core_jax.text.train_bpe import main

    captions = tmp_path / "captions.txt"
    captions.write_text("a cat on a mat\na dog on a log\n\n" * 5, encoding="utf-8")
    assert (
        main(["--captions_file", str(captions), "--vocab_size", "300", "--out", str(tmp_path / "m.txt")]) == 0
    )
    assert BPETokenizer.from_merges(str(tmp_path / "m.txt")).tokenize(["a cat"])[0]
    # Importing the CLI module rebinds core_jax.text.train_bpe; it must stay callable.
    import core_jax.text

    assert os.path.exists(core_jax.text.train_bpe(["x y"] * 3, 270, str(tmp_path / "n.txt")))


def test_bad_merges_files(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("#version: 0.2\nc a t\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected a merge"):
        BPETokenizer.from_merges(str(bad))
    bad.write_text("#version: 0.2\nca t\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no earlier line"):
        BPETokenizer.from_merges(str(bad))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        BPETokenizer.from_merges(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="pad_mode"):
        BPETokenizer.from_merges(str(tmp_path / "bad.txt"), pad_mode="left")


def test_tokenizer_from_config_trains_once(tmp_path):
    captions = tmp_path / "caps.txt"
    captions.write_text("a red cube\na blue ball\n" * 10, encoding="utf-8")
    config = ml_collections.ConfigDict(
        dict(
            merges_file="",
            context_length=8,
            pad_mode="per_position",
            vocab_size=300,
            train_source=str(captions),
        )
    )
    tok = tokenizer_from_config(config, workdir=str(tmp_path / "wd"))
    path = tmp_path / "wd" / "tokenizer" / "merges.txt"
    assert tok.path == str(path) and tok.context_length == 8
    assert tok.total_vocab_size == tok.vocab_size + 8
    before = path.read_bytes()
    # An existing file is reused (a resumed run keeps its ids), not retrained.
    assert tokenizer_from_config(config, str(tmp_path / "wd")).vocab_size == tok.vocab_size
    assert path.read_bytes() == before
    direct = tokenizer_from_config(dict(merges_file=str(path), context_length=8))
    assert direct.pad_mode == "zeros" and direct.vocab_size == tok.vocab_size


def test_workdir_tokenizer_checked_against_the_config(tmp_path):
    """A merges file left in a workdir (by a failed run, say) is reused only when it was trained
    from what the config asks for: its merges.json record, else the workdir's config.json."""
    from core_jax.config import ConfigError

    captions = tmp_path / "caps.txt"
    captions.write_text("a red cube\na blue ball\n" * 10, encoding="utf-8")
    other = tmp_path / "other.txt"
    other.write_text("a green cone\n" * 10, encoding="utf-8")
    config = ml_collections.ConfigDict(
        dict(merges_file="", context_length=8, vocab_size=300, train_source=str(captions))
    )
    wd = tmp_path / "wd"
    tokenizer_from_config(config, str(wd))
    path = wd / "tokenizer" / "merges.txt"
    before = path.read_bytes()
    config.vocab_size = 280
    with pytest.raises(
        ConfigError,
        match=r"trained with vocab_size=300 on .*caps.txt.* asks for "
        r"vocab_size=280",
    ) as e:
        tokenizer_from_config(config, str(wd))
    assert len(str(e.value).splitlines()) == 1 and "delete" in str(e.value)
    config.vocab_size, config.train_source = 300, str(other)
    with pytest.raises(ConfigError, match="other.txt"):
        tokenizer_from_config(config, str(wd))
    assert path.read_bytes() == before  # never retrained behind the user's back
    # Without a record (a workdir from before them), the workdir's config.json is the reference.
    os.remove(wd / "tokenizer" / "merges.json")
    (wd / "config.json").write_text(
        json.dumps({"text": {"merges_file": "", "vocab_size": 300, "train_source": str(other)}})
    )
    assert tokenizer_from_config(config, str(wd)).vocab_size > 256
    config.vocab_size = 290
    with pytest.raises(ConfigError, match="trained with vocab_size=300"):
        tokenizer_from_config(config, str(wd))
    # A copy of a merges file the previous run named, now asked to be trained here.
    (wd / "config.json").write_text(json.dumps({"text": {"merges_file": "/data/m.txt"}}))
    with pytest.raises(ConfigError, match="copy of text.merges_file='/data/m.txt'"):
        tokenizer_from_config(config, str(wd))


def test_tokenizer_defaults_are_never_silent(tmp_path):
    """train_source '' trains on the shapes captions only for data.source='shapes'; any other source
    must name its captions (or a merges file), before anything is trained."""
    from core_jax.config import ConfigError

    config = dict(merges_file="", vocab_size=400, context_length=16)
    for source in ("webdataset", "tokens", None):
        with pytest.raises(ConfigError, match=r"text.merges_file .*text.train_source") as e:
            tokenizer_from_config(config, str(tmp_path / "a"), data_source=source)
        assert len(str(e.value).splitlines()) == 1
    assert not (tmp_path / "a").exists()
    tok = tokenizer_from_config(config, str(tmp_path / "b"), data_source="shapes")
    assert json.loads((tmp_path / "b" / "tokenizer" / "merges.json").read_text()) == {
        "vocab_size": 400,
        "train_source": "shapes",
    }
    # Naming the shapes captions is an explicit choice, allowed with any source.
    again = tokenizer_from_config(
        dict(config, train_source="shapes"), str(tmp_path / "b"), data_source="webdataset"
    )
    assert again.merges == tok.merges


def test_tokenizer_from_config_missing_files(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        tokenizer_from_config(dict(merges_file=str(tmp_path / "missing.txt")))
    with pytest.raises(FileNotFoundError, match="nocaps.txt"):
        tokenizer_from_config(
            dict(merges_file="", vocab_size=300, train_source=str(tmp_path / "nocaps.txt")), str(tmp_path)
        )
    monkeypatch.setattr("core_jax.text.bpe.find_open_clip_merges", lambda: None)
    with pytest.raises(FileNotFoundError, match="open_clip"):
        tokenizer_from_config(dict(merges_file="open_clip"))


def test_find_open_clip_merges_does_not_import(tmp_path, monkeypatch):
    package = tmp_path / "open_clip"
    package.mkdir()
    (package / "__init__.py").write_text('raise ImportError("must not be imported")\n')
    (package / "bpe_simple_vocab_16e6.txt.gz").write_bytes(gzip.compress(TINY_MERGES.encode()))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "open_clip", raising=False)
    path = find_open_clip_merges()
    assert path == str(package / "bpe_simple_vocab_16e6.txt.gz")
    assert "open_clip" not in sys.modules
    tok = tokenizer_from_config(dict(merges_file="open_clip", context_length=10))
    assert tok.vocab_size == TINY_VOCAB


def _clip_merges():
    return os.environ.get("CLIP_MERGES_FILE") or find_open_clip_merges()


@pytest.mark.skipif(
    not _clip_merges(),
    reason="needs the real CLIP merges: install open_clip_torch "
    "or set CLIP_MERGES_FILE to bpe_simple_vocab_16e6.txt.gz",
)
def test_real_clip_ids():
    tok = BPETokenizer.from_merges(_clip_merges())
    assert (tok.vocab_size, tok.start_id, tok.end_id, tok.context_length) == (49408, 49406, 49407, 77)
    ids = tok.encode(["a photo of a cat.", "It's a DOG's life!!", "Héllo wörld 😀 12.5%"])
    np.testing.assert_array_equal(ids[0, :9], [49406, 320, 1125, 539, 320, 2368, 269, 49407, 0])
    assert not ids[0, 9:].any()
    # Expected ids from OpenAI's SimpleTokenizer.
    assert ids[1, :9].tolist() == [49406, 585, 568, 320, 1929, 568, 970, 748, 49407]
    assert ids[2, :14].tolist() == [
        49406,
        71,
        3459,
        19293,
        86,
        31762,
        730,
        7334,
        272,
        273,
        269,
        276,
        260,
        49407,
    ]
    long = tok.encode(["cat " * 100])[0]
    assert long[0] == 49406 and long[-1] == 49407 and (long[1:-1] == 2368).all()


def test_bpe_dropout_only_where_asked(shapes_merges):
    """BPE dropout (text.bpe_dropout; the DALL-E paper's 0.1) splits words into smaller pieces of
    the same vocabulary at random. HF's RNG is not seedable, so this is checked statistically: with
    dropout the pieces vary over encodings and still decode to the caption; without, they never do."""
    from core_jax.config import ConfigError
    from core_jax.text import training_tokenizer

    caption = "a purple triangle to the left of a yellow circle"
    plain = BPETokenizer.from_merges(shapes_merges, context_length=64, pad_mode="per_position")
    assert len({tuple(plain.encode([caption])[0]) for _ in range(50)}) == 1
    assert training_tokenizer(plain, dict(bpe_dropout=0.0)) is plain
    dropped = training_tokenizer(plain, ml_collections.ConfigDict(dict(bpe_dropout=0.3)))
    assert dropped.dropout == 0.3 and plain.dropout == 0.0  # the eval tokenizer is unchanged
    encodings = [dropped.encode([caption])[0] for _ in range(50)]
    assert len({tuple(e) for e in encodings}) > 10
    reference = plain.tokenize([caption])[0]
    assert all(len(dropped.tokenize([caption])[0]) >= len(reference) for _ in range(20))
    assert max(len(dropped.tokenize([caption])[0]) for _ in range(20)) > len(reference)
    assert all(dropped.decode(e) == caption for e in encodings)
    assert all(e.max() < dropped.total_vocab_size for e in encodings)
    assert pickle.loads(pickle.dumps(dropped)).dropout == 0.3  # data workers keep it
    with pytest.raises(ConfigError, match="text.bpe_dropout must be in"):
        training_tokenizer(plain, dict(bpe_dropout=1.0))


def test_dalle_bpe_dropout_on_training_captions_only(shapes_merges, tmp_path):
    import numpy as np
    from configs.dalle_paper import get_config as paper_config
    from configs.dalle_shapes import get_config
    from dalle_jax import dalle_task, run_config

    assert paper_config().text.bpe_dropout == 0.1 and get_config().text.bpe_dropout == 0.0
    config = get_config()
    config.model.caption_dropout = 0.0
    config.text.bpe_dropout = 0.3
    config.text.merges_file = shapes_merges
    config.data.source = "folder"  # examples carry their image tokens: no dVAE needed
    run = run_config.resolve_run(config, str(tmp_path))
    tokenizer = BPETokenizer.from_merges(shapes_merges, context_length=16, pad_mode="per_position")
    raw = {
        "caption": "a purple triangle to the left of a yellow circle",
        "image_tokens": np.zeros(run.cfg.num_image_tokens, np.int32),
    }
    texts = {}
    for train in (True, False):
        fn = dalle_task.make_example_fn(run, None, train=train)
        texts[train] = {tuple(fn(raw, np.random.default_rng(i))["text"]) for i in range(30)}
    assert len(texts[True]) > 5 and texts[False] == {tuple(tokenizer.encode([raw["caption"]])[0])}


def test_clip_bpe_dropout_on_training_captions_only(shapes_merges):
    import numpy as np
    from clip_jax.task import make_example_fns
    from configs.clip_shapes import get_config

    config = get_config()
    assert config.text.bpe_dropout == 0.0
    config.text.bpe_dropout = 0.3
    tokenizer = BPETokenizer.from_merges(shapes_merges, context_length=16)
    train_fn, eval_fn = make_example_fns(config, tokenizer)
    raw = shapes.make_example("train", 0)
    raw = {"image": raw["image"], "caption": "a purple triangle to the left of a yellow circle"}
    train = {tuple(train_fn(raw, np.random.default_rng(i))["text"]) for i in range(30)}
    held = {tuple(eval_fn(raw, np.random.default_rng(i))["text"]) for i in range(30)}
    assert len(train) > 5 and held == {tuple(tokenizer.encode([raw["caption"]])[0])}
