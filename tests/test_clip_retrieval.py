"""Retrieval recall@k against brute force, caption transport, and masking of padded rows."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np
import pytest

from clip_jax import evaluate as ev
from clip_jax import retrieval


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def brute_force(image_emb, text_emb, text_image, ks):
    """The COCO protocol spelled out with full sorts."""
    sim = image_emb @ text_emb.T
    out = {}
    for k in ks:
        i2t = []
        for i in range(len(image_emb)):
            own = set(np.flatnonzero(text_image == i))
            if own:
                i2t.append(bool(own & set(np.argsort(-sim[i])[:k])))
        t2i = [text_image[j] in np.argsort(-sim[:, j])[:k] for j in range(len(text_emb))]
        out[f"i2t_r{k}"], out[f"t2i_r{k}"] = np.mean(i2t), np.mean(t2i)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_brute_force_with_several_captions_per_image(seed):
    rng = np.random.default_rng(seed)
    n, dim = 23, 6
    # 0 to 4 captions per image (image 3 has none); captions correlate with their image a little
    # so that recalls are neither 0 nor 1.
    per_image = rng.integers(1, 5, size=n)
    per_image[3] = 0
    text_image = np.repeat(np.arange(n), per_image)
    image_emb = unit(rng.normal(size=(n, dim)))
    text_emb = unit(image_emb[text_image] + 1.2 * rng.normal(size=(len(text_image), dim)))
    ks = (1, 2, 5, 10)
    expected = brute_force(image_emb, text_emb, text_image, ks)
    for chunk in (4, 1024):  # chunking must not change anything
        got = retrieval.recall_at_k(image_emb, text_emb, text_image, ks=ks, chunk=chunk)
        assert got == pytest.approx(expected)
    assert 0 < expected["i2t_r1"] < expected["i2t_r10"]
    assert 0 < expected["t2i_r1"] < expected["t2i_r10"] < 1


def test_any_caption_counts_for_image_to_text():
    # Image 0's first caption is far away but its second is the nearest text: a hit at 1.
    image_emb = np.eye(3, dtype=np.float32)
    text_emb = unit(np.array([[0.3, 0, 1], [1, 0.1, 0], [0, 1, 0.1], [0.1, 0, 1]], np.float32))
    text_image = np.array([0, 0, 1, 2])
    got = retrieval.recall_at_k(image_emb, text_emb, text_image, ks=(1,))
    assert got["i2t_r1"] == 1.0
    assert got["t2i_r1"] == 0.75  # the first caption's best image is image 2, not 0


def test_bad_text_image_index_is_an_error():
    with pytest.raises(ValueError, match="image index"):
        retrieval.recall_at_k(np.eye(2), np.eye(2), np.array([0, 2]))


def test_captions_round_trip_through_fixed_byte_rows():
    captions = ["a red circle", "", "  ", "naïve café ☕", "x" * 1000, "dropped"]
    rows, count = retrieval.encode_captions(captions, max_captions=3, width=32)
    assert rows.shape == (3, 32) and rows.dtype == np.uint8 and count == 3
    assert retrieval.decode_captions(rows, count) == ["a red circle", "naïve café ☕", "x" * 32]


class CaptionEncoder:
    """Image i embeds as e_i; caption 'img{i} ...' embeds as e_i, so every recall is 1."""

    image_size = 8

    def __init__(self, n):
        self.eye = np.eye(n, dtype=np.float32)

    def embed_images(self, images):
        return self.eye[np.asarray(images)[:, 0, 0, 0].astype(int)]

    def embed_texts(self, texts):
        return self.eye[[int(t.split()[0][3:]) for t in texts]]


def test_embed_dataset_masks_padding_and_keeps_caption_order():
    n = 11
    fn = retrieval.retrieval_example_fn(image_size=8, max_captions=2)

    def load(i):
        img = np.zeros((8, 8, 3), np.uint8)
        img[0, 0, 0] = i
        captions = [f"img{i} caption {j}" for j in range(i % 4)]  # i % 4 == 0: no caption
        return fn({"image": img, "caption": captions[0] if captions else "", "captions": captions})

    skipped = {}
    batches = ev.padded_batches(n, load, 4, skipped=skipped)
    enc = CaptionEncoder(n)
    image_emb, captions, text_image = retrieval.embed_dataset(enc, batches)
    kept = [i for i in range(n) if i % 4]
    assert skipped == {"empty_caption": 3}
    assert len(image_emb) == len(kept)
    expected = [f"img{i} caption {j}" for i in kept for j in range(min(i % 4, 2))]
    assert captions == expected
    assert [kept[t] for t in text_image] == [int(c.split()[0][3:]) for c in captions]
    got = retrieval.recall_at_k(image_emb, enc.embed_texts(captions), text_image)
    assert all(v == 1.0 for v in got.values())
