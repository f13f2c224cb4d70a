"""Weight import: layouts, configs, refusal of pickles, a numpy reference of OpenAI's forward pass,
and (when torch + open_clip are installed) parity with a random-weight open_clip model."""

import math
import zipfile

import flax
import flax.linen as nn
import jax
import numpy as np
import pytest

from clip_jax import convert
from clip_jax.model import abstract_params, clip_from_config, encode_image, encode_text

W, LAYERS, PATCH, IMAGE, TEXT_W, CONTEXT, VOCAB, EMBED = 64, 2, 8, 32, 64, 16, 300, 32
encode_image = jax.jit(encode_image, static_argnums=(0, 3))
encode_text = jax.jit(encode_text, static_argnums=(0, 3))


def block_weights(rng, prefix, width):
    n = lambda *s: (0.02 * rng.standard_normal(s) + (0 if len(s) > 1 else 0.01)).astype(np.float32)
    return {
        f"{prefix}ln_1.weight": 1 + n(width),
        f"{prefix}ln_1.bias": n(width),
        f"{prefix}attn.in_proj_weight": n(3 * width, width) * 5,
        f"{prefix}attn.in_proj_bias": n(3 * width),
        f"{prefix}attn.out_proj.weight": n(width, width) * 5,
        f"{prefix}attn.out_proj.bias": n(width),
        f"{prefix}ln_2.weight": 1 + n(width),
        f"{prefix}ln_2.bias": n(width),
        f"{prefix}mlp.c_fc.weight": n(4 * width, width) * 5,
        f"{prefix}mlp.c_fc.bias": n(4 * width),
        f"{prefix}mlp.c_proj.weight": n(width, 4 * width) * 5,
        f"{prefix}mlp.c_proj.bias": n(width),
    }


def synthetic_state_dict(seed=0, vocab=VOCAB, fp16=True):
    """An OpenAI-layout CLIP state_dict (names and shapes as released), random values."""
    rng = np.random.default_rng(seed)
    n = lambda *s: (0.05 * rng.standard_normal(s)).astype(np.float32)
    grid = IMAGE // PATCH
    sd = {
        "visual.conv1.weight": n(W, 3, PATCH, PATCH) * 3,
        "visual.class_embedding": n(W),
        "visual.positional_embedding": n(grid * grid + 1, W),
        "visual.ln_pre.weight": 1 + n(W),
        "visual.ln_pre.bias": n(W),
        "visual.ln_post.weight": 1 + n(W),
        "visual.ln_post.bias": n(W),
        "visual.proj": n(W, EMBED),
        "token_embedding.weight": n(vocab, TEXT_W),
        "positional_embedding": n(CONTEXT, TEXT_W),
        "ln_final.weight": 1 + n(TEXT_W),
        "ln_final.bias": n(TEXT_W),
        "text_projection": n(TEXT_W, EMBED),
        "logit_scale": np.array(math.log(1 / 0.07), np.float32),
    }
    for i in range(LAYERS):
        sd.update(block_weights(rng, f"visual.transformer.resblocks.{i}.", W))
        sd.update(block_weights(rng, f"transformer.resblocks.{i}.", TEXT_W))
    if fp16:  # released weights are fp16: the converter must widen them
        sd = {k: v.astype(np.float16) if v.ndim == 2 else v for k, v in sd.items()}
    return sd


# ----------------------------------------------------------------------------------------------
# A numpy float64 reference of OpenAI's model.py forward pass, written from the torch code.


def np_layer_norm(x, sd, prefix, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def np_activation(name, x):
    if name == "quick_gelu":
        return x / (1 + np.exp(-1.702 * x))
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def np_block(x, sd, p, heads, activation, causal):
    b, length, width = x.shape
    d = width // heads
    h = np_layer_norm(x, sd, p + "ln_1")
    qkv = h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]
    q, k, v = (t.reshape(b, length, heads, d) for t in np.split(qkv, 3, axis=-1))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    if causal:
        logits = logits + np.triu(np.full((length, length), -np.inf), 1)
    att = np.exp(logits - logits.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, length, width)
    x = x + o @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    h = np_layer_norm(x, sd, p + "ln_2")
    h = np_activation(activation, h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
    return x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def np_encode_image(sd, images_nhwc, heads, activation):
    x = images_nhwc.transpose(0, 3, 1, 2).astype(np.float64)  # torch NCHW
    w = sd["visual.conv1.weight"]
    o, c, p, _ = w.shape
    b, _, h, _ = x.shape
    g = h // p
    x = np.einsum("bcgyhx,ocyx->bgho", x.reshape(b, c, g, p, g, p), w).reshape(b, g * g, o)
    cls = np.broadcast_to(sd["visual.class_embedding"], (b, 1, o))
    x = np.concatenate([cls, x], 1) + sd["visual.positional_embedding"]
    x = np_layer_norm(x, sd, "visual.ln_pre")
    for i in range(LAYERS):
        x = np_block(x, sd, f"visual.transformer.resblocks.{i}.", heads, activation, causal=False)
    return np_layer_norm(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]


def np_encode_text(sd, tokens, heads, activation):
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][: tokens.shape[1]]
    for i in range(LAYERS):
        x = np_block(x, sd, f"transformer.resblocks.{i}.", heads, activation, causal=True)
    x = np_layer_norm(x, sd, "ln_final")
    return x[np.arange(len(tokens)), tokens.argmax(-1)] @ sd["text_projection"]


def normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_tokens(rng, batch, vocab=VOCAB):
    tokens = np.zeros((batch, CONTEXT), np.int32)
    for row in tokens:
        n = int(rng.integers(1, CONTEXT - 1))
        row[0] = vocab - 2  # start
        row[1 : n + 1] = rng.integers(1, vocab - 2, n)
        row[n + 1] = vocab - 1  # end: the largest id
    return tokens


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan", [True, False])
def test_synthetic_state_dict_converts_to_the_init_tree(scan):
    sd = synthetic_state_dict()
    config = convert.build_config(sd, source="openai", model="tiny", merges_file="")
    config.scan_layers = scan
    params = convert.convert_state_dict(sd, config)
    expected = flax.traverse_util.flatten_dict(nn.meta.unbox(abstract_params(clip_from_config(config))))
    got = flax.traverse_util.flatten_dict(params)
    assert set(got) == set(expected)
    for key, leaf in expected.items():
        assert got[key].shape == leaf.shape, key
        assert got[key].dtype == np.float32, key  # fp16 was widened
    convert.check_against_model(params, config)  # the converter's own guard agrees
    m = config.model
    assert (m.image_size, m.patch_size, m.vision_width, m.vision_layers, m.vision_heads) == (
        IMAGE,
        PATCH,
        W,
        LAYERS,
        1,
    )
    assert (m.text_width, m.text_layers, m.embed_dim, config.text.vocab_size, config.text.context_length) == (
        TEXT_W,
        LAYERS,
        EMBED,
        VOCAB,
        CONTEXT,
    )
    assert m.ln_eps == 1e-5 and m.activation == "quick_gelu" and m.loss == "softmax"
    # q rows of in_proj, transposed to (in, out) and split into heads
    layer = (
        params["visual"]["transformer"]["scan"]["block"]
        if scan
        else params["visual"]["transformer"]["layer_1"]
    )
    q = layer["attn"]["q_kernel"][1] if scan else layer["attn"]["q_kernel"]
    w_q = sd["visual.transformer.resblocks.1.attn.in_proj_weight"][:W].astype(np.float32)
    np.testing.assert_array_equal(q.reshape(W, W), w_q.T)


@pytest.mark.parametrize(
    "source,model,activation",
    [
        ("openai", "tiny", "quick_gelu"),
        ("open_clip", "custom", "gelu"),
        ("open_clip", "custom-quickgelu", "quick_gelu"),
    ],
)
def test_converted_model_matches_numpy_reference(source, model, activation):
    sd = synthetic_state_dict(seed=1)
    config = convert.build_config(sd, source=source, model=model, merges_file="")
    assert config.model.activation == activation
    params = convert.convert_state_dict(sd, config)
    clip = clip_from_config(config)
    rng = np.random.default_rng(2)
    images = rng.normal(size=(3, IMAGE, IMAGE, 3)).astype(np.float32)
    tokens = random_tokens(rng, 3)
    sd64 = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    ref_img = np_encode_image(sd64, images, 1, activation)
    ref_txt = np_encode_text(sd64, tokens, 1, activation)
    got_img = encode_image(clip, params, images, False)
    got_txt = encode_text(clip, params, tokens, False)
    assert np.abs(ref_img).max() > 0.1 and np.abs(ref_txt).max() > 0.1
    np.testing.assert_allclose(got_img, ref_img, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got_txt, ref_txt, atol=1e-4, rtol=1e-4)
    other = "gelu" if activation == "quick_gelu" else "quick_gelu"
    assert np.abs(np_encode_image(sd64, images, 1, other) - ref_img).max() > 1e-3  # test can fail


def test_build_config_checks_known_models():
    sd = synthetic_state_dict()
    with pytest.raises(convert.ConversionError, match="ViT-B/32: expects patch_size=32"):
        convert.build_config(sd, source="openai", model="ViT-B/32")
    with pytest.raises(convert.ConversionError, match="--source"):
        convert.build_config(sd, source="hf", model="x")
    assert convert.canonical_name("ViT-B-16-quickgelu") == ("ViT-B-16", True)
    assert convert.canonical_name("ViT-L/14") == ("ViT-L-14", False)
    sd_sig = dict(sd, logit_bias=np.array(-10.0, np.float32))
    config = convert.build_config(sd_sig, source="open_clip", model="siglip-like", merges_file="")
    assert config.model.loss == "sigmoid"
    assert float(convert.convert_state_dict(sd_sig, config)["logit_bias"]) == -10.0


def test_unknown_and_missing_keys_are_errors():
    sd = synthetic_state_dict()
    config = convert.build_config(sd, source="openai", model="tiny", merges_file="")
    with pytest.raises(convert.ConversionError, match="no place for.*visual.attn_pool"):
        convert.convert_state_dict(dict(sd, **{"visual.attn_pool.weight": np.zeros(3)}), config)
    broken = {k: v for k, v in sd.items() if k != "transformer.resblocks.1.mlp.c_fc.bias"}
    with pytest.raises(convert.ConversionError, match="mlp.c_fc.bias"):
        convert.convert_state_dict(broken, config)
    with pytest.raises(convert.ConversionError, match="not an OpenAI/open_clip ViT"):
        convert.build_config({"conv1.weight": np.zeros((64, 3, 7, 7))}, source="openai", model="RN50")
    # OpenAI's TorchScript archives carry three extra scalars, which are ignored.
    extras = dict(sd, input_resolution=np.array(224), context_length=np.array(77), vocab_size=np.array(VOCAB))
    convert.convert_state_dict(extras, config)


def test_torchscript_archives_need_trust_pickle(tmp_path):
    path = tmp_path / "ViT-B-32.pt"
    with zipfile.ZipFile(path, "w") as z:  # the layout of torch.jit.save archives
        z.writestr("ViT-B-32/constants.pkl", b"\x80\x02}q\x00.")
        z.writestr("ViT-B-32/code/__torch__/model.py", "")
    with pytest.raises(convert.ConversionError, match="--trust_pickle"):
        convert.load_state_dict(str(path))
    with pytest.raises(convert.ConversionError, match="not found"):
        convert.load_state_dict(str(tmp_path / "missing.pt"))


def test_npz_checkpoint_converts_into_a_loadable_workdir(tmp_path):
    from clip_jax.api import CLIPModel
    from core_jax.text import train_bpe, BPETokenizer

    merges = train_bpe(
        [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")] * 3,
        VOCAB,
        str(tmp_path / "merges.txt"),
    )
    vocab = BPETokenizer.from_merges(merges).vocab_size
    sd = synthetic_state_dict(seed=3, vocab=vocab)
    np.savez(tmp_path / "ckpt.npz", **sd)
    workdir = str(tmp_path / "w")
    convert.main(
        [
            "--source",
            "open_clip",
            "--checkpoint",
            str(tmp_path / "ckpt.npz"),
            "--model",
            "tiny",
            "--workdir",
            workdir,
            "--merges_file",
            merges,
        ]
    )
    clip = CLIPModel.load(workdir)
    assert clip.config.model.activation == "gelu" and clip.image_size == IMAGE
    images = np.random.default_rng(4).integers(0, 256, (2, IMAGE, IMAGE, 3), dtype=np.uint8)
    sd64 = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    ref = normalize(np_encode_image(sd64, clip.preprocess_images(images), 1, "gelu"))
    np.testing.assert_allclose(clip.embed_images(images), ref, atol=1e-4)
    texts = ["a red circle", "a green square"]
    ref = normalize(np_encode_text(sd64, clip.tokenizer.encode(texts), 1, "gelu"))
    np.testing.assert_allclose(clip.embed_texts(texts), ref, atol=1e-4)
    assert clip.logit_scale() == pytest.approx(1 / 0.07, rel=1e-4)
    with pytest.raises(SystemExit) as e:  # a vocabulary that does not fit the tokenizer: exit 2
        np.savez(tmp_path / "bad.npz", **synthetic_state_dict(vocab=vocab - 5))
        convert.main(
            [
                "--source",
                "openai",
                "--checkpoint",
                str(tmp_path / "bad.npz"),
                "--model",
                "tiny",
                "--workdir",
                str(tmp_path / "w2"),
                "--merges_file",
                merges,
            ]
        )
    assert e.value.code == 2


# ----------------------------------------------------------------------------------------------
# Parity with open_clip itself (needs torch + open_clip_torch; skipped otherwise).


def _open_clip():
    try:
        import open_clip
        import torch
    except ImportError as e:
        pytest.skip(f"open_clip parity needs torch and open_clip_torch ({e})")
    return open_clip, torch


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_parity(tmp_path, quick_gelu):
    open_clip, torch = _open_clip()
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=EMBED,
        quick_gelu=quick_gelu,
        vision_cfg=dict(image_size=IMAGE, patch_size=PATCH, width=W, layers=LAYERS, head_width=32),
        text_cfg=dict(context_length=CONTEXT, vocab_size=49408, width=TEXT_W, heads=2, layers=LAYERS),
    )
    with torch.no_grad():  # open_clip zero-inits biases: randomise everything so layouts matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.logit_scale.fill_(math.log(30.0))
    model.eval()
    path = str(tmp_path / "open_clip.pt")
    torch.save(model.state_dict(), path)
    sd = convert.load_state_dict(path)
    name = "custom-quickgelu" if quick_gelu else "custom"
    config = convert.build_config(
        sd, source="open_clip", model=name, merges_file="", vision_heads=W // 32, text_heads=2
    )
    params = convert.convert_state_dict(sd, config)
    clip = clip_from_config(config)
    rng = np.random.default_rng(5)
    images = rng.normal(size=(4, IMAGE, IMAGE, 3)).astype(np.float32)
    tokens = random_tokens(rng, 4, vocab=49408)
    with torch.no_grad():
        ref_img = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
        ref_txt = model.encode_text(torch.from_numpy(tokens.astype(np.int64))).numpy()
        ref_scale = float(model.logit_scale.exp())
    got_img = np.asarray(encode_image(clip, params, images, False))
    got_txt = np.asarray(encode_text(clip, params, tokens, False))
    ref_logits = ref_scale * normalize(ref_img) @ normalize(ref_txt).T
    got_logits = ref_scale * normalize(got_img) @ normalize(got_txt).T
    errors = {
        "image": np.abs(got_img - ref_img).max(),
        "text": np.abs(got_txt - ref_txt).max(),
        "logits": np.abs(got_logits - ref_logits).max(),
    }
    print(f"open_clip parity (quick_gelu={quick_gelu}) max abs error: {errors}")
    assert all(e <= 1e-4 for e in errors.values()), errors
    assert np.abs(ref_img).max() > 0.1


def test_full_pickles_need_trust_pickle(tmp_path):
    _, torch = _open_clip()
    path = str(tmp_path / "full.pt")
    torch.save({"state_dict": {"x": torch.zeros(2)}, "note": _Opaque()}, path)
    with pytest.raises(convert.ConversionError, match="--trust_pickle"):
        convert.load_state_dict(path)
    assert list(convert.load_state_dict(path, trust_pickle=True)) == ["x"]


class _Opaque:
    """A class torch's weights_only loader refuses to unpickle."""
