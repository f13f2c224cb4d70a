"""Import OpenAI's released dVAE (their `dall_e` encoder/decoder) into a workdir that every dVAE
command loads like a trained one.

    python -m dalle_jax.convert_dvae --encoder encoder.pkl --decoder decoder.pkl --workdir W [--trust_pickle]

Inputs may be plain state_dicts (loaded with torch's weights_only=True), OpenAI's whole pickled
modules (loading a pickle runs code from the file, so it needs --trust_pickle and the `dall_e`
package importable; core_jax.pickle_check refuses one before anything is unpickled, torch or not),
or .npz files of the same names (no torch needed). Torch is imported only here.
Sizes (hidden width, groups, blocks, vocab, decoder init channels) are read from the weights.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import flax.linen as nn
import jax
import numpy as np

from core_jax import checkpoint
from core_jax.app import load_config
from core_jax.cli import ArgumentParser, fail
from core_jax.errors import ConversionError
from core_jax.pickle_check import refuse_code
from dalle_jax.dvae import default_model_config, grid_size, make_dvae

_BLOCK = re.compile(r"^blocks\.group_(\d+)\.block_(\d+)\.(id_path|res_path\.conv_(\d+))\.([wb])$")
_EDGE = {
    "blocks.input.w": ("input", "kernel"),
    "blocks.input.b": ("input", "bias"),
    "blocks.output.conv.w": ("output", "kernel"),
    "blocks.output.conv.b": ("output", "bias"),
}


def _strip_prefix(sd: Mapping[str, np.ndarray]) -> dict:
    # Modules wrapped by DataParallel / saved from a parent module carry a prefix before 'blocks.'.
    out = {}
    for k, v in sd.items():
        i = k.find("blocks.")
        out[k[i:] if i > 0 else k] = v
    return out


def _to_flax(sd: Mapping[str, np.ndarray], which: str) -> dict:
    """OpenAI names -> nested Flax params; OIHW conv weights -> HWIO."""
    tree: dict = {}
    for name, value in _strip_prefix(sd).items():
        value = np.asarray(value, np.float32)
        if name in _EDGE:
            path = _EDGE[name]
        else:
            m = _BLOCK.match(name)
            if not m:
                raise ConversionError(f"{which}: unexpected weight {name!r} (not an OpenAI dVAE {which})")
            group, block, kind, conv, wb = m.groups()
            module = "id_path" if kind == "id_path" else f"conv_{conv}"
            path = (f"group_{group}", f"block_{block}", module, "kernel" if wb == "w" else "bias")
        if path[-1] == "kernel":
            if value.ndim != 4:
                raise ConversionError(
                    f"{which}: {name} should be a 4-d OIHW conv weight, got shape {value.shape}"
                )
            value = value.transpose(2, 3, 1, 0)
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        if path[-1] in node:
            raise ConversionError(f"{which}: {name} given twice")
        node[path[-1]] = value
    return tree


def infer_model_config(encoder: dict, decoder: dict):
    """config.model for the weights (Flax trees from `_to_flax`)."""

    try:
        hidden = encoder["input"]["kernel"].shape[-1]
        channels = encoder["input"]["kernel"].shape[-2]
        vocab = encoder["output"]["kernel"].shape[-1]
        groups = sorted(int(k.split("_")[1]) for k in encoder if k.startswith("group_"))
        blocks = sorted(int(k.split("_")[1]) for k in encoder["group_1"])
        mults = [encoder[f"group_{g}"]["block_1"]["conv_4"]["kernel"].shape[-1] // hidden for g in groups]
        init = decoder["input"]["kernel"].shape[-1]
        dec_vocab = decoder["input"]["kernel"].shape[-2]
        dec_out = decoder["output"]["kernel"].shape[-1]
    except KeyError as e:
        raise ConversionError(f"missing weight group {e} in the encoder or decoder") from None
    if groups != list(range(1, len(groups) + 1)) or blocks != list(range(1, len(blocks) + 1)):
        raise ConversionError(f"groups {groups} / blocks {blocks} are not numbered 1..n")
    if dec_vocab != vocab:
        raise ConversionError(f"encoder has {vocab} codes but decoder expects {dec_vocab}")
    if dec_out != 2 * channels:
        raise ConversionError(f"decoder outputs {dec_out} channels, expected 2 * {channels}")
    m = default_model_config()
    m.update(
        dict(
            vocab_size=int(vocab),
            hidden=int(hidden),
            width_multipliers=tuple(int(x) for x in mults),
            blocks_per_group=len(blocks),
            decoder_init_channels=int(init),
            input_channels=int(channels),
        )
    )
    return m


def convert_state_dicts(encoder_sd: Mapping[str, np.ndarray], decoder_sd: Mapping[str, np.ndarray]):
    """(model_config, params) from OpenAI encoder/decoder state_dicts (numpy arrays, OIHW).

    The params tree is checked against the Flax model's own init tree: same names, same shapes."""

    params = {"encoder": _to_flax(encoder_sd, "encoder"), "decoder": _to_flax(decoder_sd, "decoder")}
    m = infer_model_config(params["encoder"], params["decoder"])
    model = make_dvae(m)
    x = jax.ShapeDtypeStruct(
        (
            1,
            8 * 2 ** (len(m.width_multipliers) - 1),
            8 * 2 ** (len(m.width_multipliers) - 1),
            m.input_channels,
        ),
        np.float32,
    )
    expected = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
    want = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ConversionError(
            f"weights do not match the dVAE architecture: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    bad = [(k, got[k], want[k]) for k in want if got[k] != want[k]]
    if bad:
        raise ConversionError(f"weight shapes do not match the architecture, e.g. {bad[:3]} (got, want)")
    return m, params


def load_weights(path: str, trust_pickle: bool = False) -> dict:
    """name -> float32 numpy array, from a .npz, a torch state_dict, or (trusted) a pickled module."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    # Before torch: a pickle that would run code is refused whether or not torch is installed.
    refuse_code(path, trust_pickle, hint=" (OpenAI's release needs the dall_e package)")
    try:
        import torch  # lazy: optional extra, for converting only
    except ImportError:
        raise ConversionError(
            "reading PyTorch weight files needs torch, an optional extra: "
            "pip install torch (or pass .npz files)"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if not trust_pickle:
            raise ConversionError(
                f"{path} is not a plain state_dict (torch says: {str(e).splitlines()[0][:200]}). It is "
                f"probably a pickled module; loading it runs code from the file. Pass --trust_pickle "
                f"only if you trust where it came from (OpenAI's release needs the dall_e package)."
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except ModuleNotFoundError as e2:
            raise ConversionError(
                f"{path} pickles a module from a package that is not installed ({e2}); "
                f"for OpenAI's files: pip install --no-deps DALL-E"
            ) from None
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a module or state_dict")
    return {k: v.detach().to(torch.float32).cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def openai_config(model_config, image_size: int = 256):
    """configs/dvae_openai.py with the model sizes of the converted weights."""

    config = load_config("dvae_openai")
    with config.unlocked():
        config.model = model_config
    config.data.image_size = int(image_size)
    return config


def convert(encoder_path: str, decoder_path: str, workdir: str, *, trust_pickle=False, image_size=256):
    if checkpoint.latest_step(workdir) is not None:
        raise ConversionError(f"{workdir} already holds a checkpoint; choose an empty workdir")
    m, params = convert_state_dicts(
        load_weights(encoder_path, trust_pickle), load_weights(decoder_path, trust_pickle)
    )
    config = openai_config(m, image_size)
    grid_size(m, image_size)
    checkpoint.save_params(workdir, config, params, step=0)
    return config


def parse_args(argv=None):
    parser = ArgumentParser(
        prog="python -m dalle_jax.convert_dvae",
        description="Convert OpenAI's dVAE weights into a dVAE workdir.",
    )
    parser.add_argument(
        "--encoder", required=True, help="OpenAI encoder: pickled module, state_dict, or .npz."
    )
    parser.add_argument(
        "--decoder", required=True, help="OpenAI decoder: pickled module, state_dict, or .npz."
    )
    parser.add_argument("--workdir", required=True, help="Workdir to create.")
    parser.add_argument(
        "--trust_pickle",
        action="store_true",
        help="Allow loading pickled modules (runs code from the files).",
    )
    parser.add_argument(
        "--image_size", type=int, default=256, help="Input size recorded in the workdir's config."
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        checkpoint.check_workdir(args.workdir)
        config = convert(
            args.encoder,
            args.decoder,
            args.workdir,
            trust_pickle=args.trust_pickle,
            image_size=args.image_size,
        )
    except (ConversionError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    m = config.model
    print(
        f"wrote {args.workdir}: vocab {m.vocab_size}, hidden {m.hidden}, groups "
        f"{list(m.width_multipliers)} x {m.blocks_per_group} blocks, image {config.data.image_size}",
        flush=True,
    )


if __name__ == "__main__":
    main()
