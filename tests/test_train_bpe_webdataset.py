"""core_jax.text.train_bpe --webdataset_urls: a BPE trained on captions streamed out of tar shards."""

import json

import pytest

from core_jax.data.sources import webdataset_captions
from core_jax.text import BPETokenizer
from core_jax.text.train_bpe import main as train_bpe_main
from tests.testfiles import write_tar


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two img2dataset-style shards: captions in .txt, in .json, and one sample with neither."""
    folder = tmp_path_factory.mktemp("wds")
    for shard in range(2):
        members = []
        for i in range(6):
            key = f"{shard:02d}{i:03d}"
            members.append((f"{key}.jpg", b"pixels are never decoded"))
            if i == 5:
                continue  # no caption: counted, not trained on
            if i % 2:
                members.append((f"{key}.txt", f"zebrafinch {shard} number {i}".encode()))
            else:
                members.append((f"{key}.json", json.dumps({"text": f"quokka {shard} number {i}"}).encode()))
        write_tar(folder / f"part-{shard:05d}.tar", members)
    return str(folder)


def test_captions_stream_from_txt_and_json_in_shard_order(shards):
    skipped = {}
    captions = list(webdataset_captions(shards + "/part-{00000..00001}.tar", "text", skipped))
    assert captions[:2] == ["quokka 0 number 0", "zebrafinch 0 number 1"]
    assert len(captions) == 10 and captions[5] == "quokka 1 number 0"
    assert skipped == {"missing_caption": 2}


def test_cli_trains_merges_that_encode_the_captions(shards, tmp_path, capsys):
    out = str(tmp_path / "merges.txt")
    argv = ["--webdataset_urls", shards + "/part-*.tar", "--caption_key", "text"]
    assert train_bpe_main(argv + ["--vocab_size", "560", "--min_frequency", "2", "--out", out]) == 0
    report = capsys.readouterr().out
    assert "from 10 captions" in report and "'missing_caption': 2" in report
    tokenizer = BPETokenizer.from_merges(out)
    # Words seen in every sample were merged whole: one id each.
    assert len(tokenizer.tokenize(["quokka"])[0]) == 1
    assert len(tokenizer.tokenize(["zebrafinch"])[0]) == 1


def test_cli_max_captions_and_missing_shard(shards, tmp_path, capsys):
    out = str(tmp_path / "m.txt")
    urls = shards + "/part-{00000..00001}.tar"
    assert (
        train_bpe_main(
            ["--webdataset_urls", urls, "--max_captions", "3", "--vocab_size", "520", "--out", out]
        )
        == 0
    )
    assert "from 3 captions" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        train_bpe_main(
            ["--webdataset_urls", shards + "/part-{00001..00002}.tar", "--vocab_size", "520", "--out", out]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "part-00002.tar" in err and len(err.strip().splitlines()) == 1
