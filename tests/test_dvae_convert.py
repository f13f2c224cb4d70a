"""Importing OpenAI's dVAE weights: name/shape mapping without torch, and numeric parity with the
reference `dall_e` modules when torch and the DALL-E package are installed."""

import importlib.util
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dalle_jax import convert_dvae, dvae as dvae_lib  # noqa: E402

HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_DALL_E = HAVE_TORCH and importlib.util.find_spec("dall_e") is not None


def openai_state_dicts(n_hid=8, groups=4, blocks=2, vocab=32, n_init=16, seed=0):
    """Synthetic OpenAI-named state_dicts (OIHW), built from OpenAI's module layout, not from ours."""
    rng = np.random.default_rng(seed)
    w = lambda o, i, k: (rng.normal(size=(o, i, k, k)) / np.sqrt(i * k * k)).astype(np.float32)
    b = lambda o: (rng.normal(size=(o,)) * 0.1).astype(np.float32)

    def blocks_of(prefix, widths_in, width_out, kernels, sd):
        for j in range(blocks):
            n_in = widths_in if j == 0 else width_out
            hid = width_out // 4
            p = f"{prefix}.block_{j + 1}"
            if n_in != width_out:
                sd[f"{p}.id_path.w"], sd[f"{p}.id_path.b"] = w(width_out, n_in, 1), b(width_out)
            chans = [n_in, hid, hid, hid, width_out]
            for c, k in enumerate(kernels):
                sd[f"{p}.res_path.conv_{c + 1}.w"] = w(chans[c + 1], chans[c], k)
                sd[f"{p}.res_path.conv_{c + 1}.b"] = b(chans[c + 1])

    mults = [2**g for g in range(groups)]
    enc = {"blocks.input.w": w(n_hid, 3, 7), "blocks.input.b": b(n_hid)}
    c = n_hid
    for g, m in enumerate(mults):
        blocks_of(f"blocks.group_{g + 1}", c, n_hid * m, (3, 3, 3, 1), enc)
        c = n_hid * m
    enc["blocks.output.conv.w"], enc["blocks.output.conv.b"] = w(vocab, c, 1), b(vocab)
    dec = {"blocks.input.w": w(n_init, vocab, 1), "blocks.input.b": b(n_init)}
    c = n_init
    for g, m in enumerate(reversed(mults)):
        blocks_of(f"blocks.group_{g + 1}", c, n_hid * m, (1, 3, 3, 3), dec)
        c = n_hid * m
    dec["blocks.output.conv.w"], dec["blocks.output.conv.b"] = w(6, c, 1), b(6)
    return enc, dec


def test_synthetic_state_dict_matches_flax_init_tree():
    enc, dec = openai_state_dicts()
    m, params = convert_dvae.convert_state_dicts(enc, dec)
    assert (
        m.vocab_size,
        m.hidden,
        tuple(m.width_multipliers),
        m.blocks_per_group,
        m.decoder_init_channels,
    ) == (32, 8, (1, 2, 4, 8), 2, 16)
    model = dvae_lib.make_dvae(m)
    init = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"])
    flat = lambda t: {
        jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(t)
    }
    assert flat(params) == flat(init)
    assert jax.tree.structure(params) == jax.tree.structure(init)
    # OIHW -> HWIO, values carried over.
    w = enc["blocks.group_2.block_1.res_path.conv_2.w"]
    np.testing.assert_array_equal(
        params["encoder"]["group_2"]["block_1"]["conv_2"]["kernel"], w.transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        params["decoder"]["input"]["kernel"][0, 0], dec["blocks.input.w"][:, :, 0, 0].T
    )
    np.testing.assert_array_equal(
        params["decoder"]["group_1"]["block_1"]["id_path"]["bias"], dec["blocks.group_1.block_1.id_path.b"]
    )
    # The converted params run.
    logits = model.apply({"params": params}, jnp.full((1, 64, 64, 3), 0.5), method=dvae_lib.DVAE.encode)
    assert logits.shape == (1, 8, 8, 32) and bool(jnp.all(jnp.isfinite(logits)))


def test_bad_state_dicts_are_rejected_clearly():
    enc, dec = openai_state_dicts(groups=3, blocks=1)
    convert_dvae.convert_state_dicts(enc, dec)  # the valid pair converts
    missing = dict(enc)
    del missing["blocks.group_2.block_1.res_path.conv_3.b"]
    with pytest.raises(convert_dvae.ConversionError, match="missing"):
        convert_dvae.convert_state_dicts(missing, dec)
    extra = dict(enc, **{"blocks.group_1.block_1.norm.w": np.zeros((8, 8, 1, 1), np.float32)})
    with pytest.raises(convert_dvae.ConversionError, match="unexpected weight"):
        convert_dvae.convert_state_dicts(extra, dec)
    wrong = dict(enc)
    wrong["blocks.group_1.block_1.res_path.conv_2.w"] = np.zeros((2, 2, 5, 5), np.float32)
    with pytest.raises(convert_dvae.ConversionError, match="shapes"):
        convert_dvae.convert_state_dicts(wrong, dec)
    _, dec_other_vocab = openai_state_dicts(groups=3, blocks=1, vocab=48)
    with pytest.raises(convert_dvae.ConversionError, match="codes"):
        convert_dvae.convert_state_dicts(enc, dec_other_vocab)


def test_npz_needs_no_torch(tmp_path):
    enc, dec = openai_state_dicts(groups=2, blocks=1)
    np.savez(tmp_path / "enc.npz", **enc)
    loaded = convert_dvae.load_weights(str(tmp_path / "enc.npz"))
    assert set(loaded) == set(enc)
    with pytest.raises(FileNotFoundError):
        convert_dvae.load_weights(str(tmp_path / "nope.pt"))


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed (optional extra)")
def test_pickled_module_needs_trust(tmp_path):
    import torch

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))
    torch.save(module, tmp_path / "module.pt")
    with pytest.raises(convert_dvae.ConversionError, match="--trust_pickle"):
        convert_dvae.load_weights(str(tmp_path / "module.pt"))
    sd = convert_dvae.load_weights(str(tmp_path / "module.pt"), trust_pickle=True)
    assert sd["0.weight"].shape == (4, 3, 1, 1)
    torch.save(module.state_dict(), tmp_path / "sd.pt")  # plain state_dicts need no trust
    assert set(convert_dvae.load_weights(str(tmp_path / "sd.pt"))) == {"0.weight", "0.bias"}


@pytest.mark.skipif(not HAVE_DALL_E, reason="torch and OpenAI's DALL-E package (dall_e) are not installed")
def test_parity_with_openai_modules(tmp_path):
    import torch
    from dall_e import Decoder, Encoder

    torch.manual_seed(0)
    enc = Encoder(n_hid=64, vocab_size=512, n_blk_per_group=1, use_mixed_precision=False)
    dec = Decoder(n_hid=64, vocab_size=512, n_init=32, n_blk_per_group=1, use_mixed_precision=False)
    with torch.no_grad():  # OpenAI inits biases to zero; random ones make the bias mapping count
        for p in list(enc.parameters()) + list(dec.parameters()):
            if p.ndim == 1:
                p.normal_(std=0.1)
    # Through files, as a user would: a whole module (trusted) and a plain state_dict.
    torch.save(enc, tmp_path / "encoder.pkl")
    torch.save(dec.state_dict(), tmp_path / "decoder.pt")
    m, params = convert_dvae.convert_state_dicts(
        convert_dvae.load_weights(str(tmp_path / "encoder.pkl"), trust_pickle=True),
        convert_dvae.load_weights(str(tmp_path / "decoder.pt")),
    )
    model = dvae_lib.make_dvae(m)

    x = np.random.default_rng(0).uniform(0.1, 0.9, size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref_logits = enc(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    logits = np.asarray(
        model.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), method=dvae_lib.DVAE.encode)
    )
    enc_err = float(np.abs(logits - ref_logits).max())

    tokens = np.random.default_rng(1).integers(0, 512, size=(2, 4, 4))
    onehot = np.eye(512, dtype=np.float32)[tokens].transpose(0, 3, 1, 2)
    with torch.no_grad():
        ref_out = dec(torch.from_numpy(onehot)).numpy().transpose(0, 2, 3, 1)
    out = np.asarray(model.apply({"params": params}, jnp.asarray(tokens), method=dvae_lib.DVAE.decode))
    dec_err = float(np.abs(out - ref_out).max())
    print(f"parity max abs error: encoder logits {enc_err:.2e}, decoder output {dec_err:.2e}")
    assert enc_err <= 1e-4 and dec_err <= 1e-4
