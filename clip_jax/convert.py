"""Import OpenAI CLIP / open_clip ViT weights into a workdir every CLIP command loads.

    python -m clip_jax.convert --source openai --checkpoint ViT-B-32.pt --model ViT-B-32 --workdir W
    python -m clip_jax.convert --source open_clip --checkpoint open_clip_pytorch_model.bin \
        --model ViT-B-32 --workdir W

Checkpoints: torch state_dicts (loaded with `weights_only=True`), `.safetensors` and `.npz` files
(no pickle, no torch needed), OpenAI's TorchScript archives and old full-pickle saves (these run
pickle code, so they are refused unless `--trust_pickle`; core_jax.pickle_check tells them apart by
reading the pickle's opcodes, never running them, with or without torch). Torch is imported only
when needed.

Layouts (reference-facts.md): torch Linear weights are (out, in) and become (in, out) kernels;
`in_proj_weight` stacks q, k, v rows; per-head dims split as (heads, head_dim); the patch conv
(W, 3, p, p) becomes a [p*p*3, W] matmul over (row, col, channel)-flattened patches; fp16 -> fp32.
"""

from __future__ import annotations

import os
import re
import zipfile

import flax
import flax.linen as nn
import jax
import numpy as np

from clip_jax import defaults
from clip_jax.model import abstract_params, clip_from_config
from clip_jax.task import make_tokenizer
from core_jax.checkpoint import check_workdir, save_params
from core_jax.cli import ArgumentParser, fail
from core_jax.errors import ConfigError, ConversionError
from core_jax.pickle_check import refuse_code

# Keys of OpenAI's TorchScript archives and open_clip buffers that carry no weights.
IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
SOURCES = ("openai", "open_clip")


# ----------------------------------------------------------------------------------------------
# Reading checkpoints.


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def _require_torch():
    try:
        import torch  # lazy: optional extra, for converting only
    except ImportError:
        raise ConversionError(
            "reading a torch checkpoint needs torch (pip install torch); "
            ".safetensors and .npz files convert without it"
        ) from None
    return torch


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; fp16/bf16 go through float32
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _unwrap(obj) -> dict:
    """Module -> state_dict; training checkpoints -> their 'state_dict'; strips DDP 'module.'."""
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        obj = obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(f"checkpoint holds a {type(obj).__name__}, not a state_dict")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def load_state_dict(path: str, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """name -> float32/int numpy array, from any supported checkpoint format."""
    if not os.path.isfile(path):
        raise ConversionError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file  # lazy: optional, comes with the torch extra

        return {
            k: np.asarray(v, np.float32) if v.dtype.kind == "f" else v for k, v in load_file(path).items()
        }
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    if _is_torchscript(path):
        if not trust_pickle:
            raise ConversionError(
                f"{path} is a TorchScript archive (OpenAI's release format); loading it runs pickle "
                f"code from the file. Pass --trust_pickle if you trust its source"
            )
        torch = _require_torch()
        state = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        # Before torch: a pickle that would run code is refused whether or not torch is installed.
        refuse_code(path, trust_pickle)
        torch = _require_torch()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses anything but tensors and plain containers
            if not trust_pickle:
                raise ConversionError(
                    f"{path} is not a plain state_dict ({type(e).__name__}: {str(e).splitlines()[0]}); "
                    f"loading it would run pickle code from the file. Pass --trust_pickle if you "
                    f"trust its source"
                ) from None
            state = torch.load(path, map_location="cpu", weights_only=False)
    return {k: _to_numpy(v) for k, v in _unwrap(state).items()}


# ----------------------------------------------------------------------------------------------
# Shapes and config from the weights.


def _count_blocks(sd: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in sd for m in [pattern.match(k)] if m}
    if not found:
        raise ConversionError(f"no transformer blocks under {prefix!r}: not a CLIP ViT checkpoint")
    if found != set(range(len(found))):
        raise ConversionError(f"blocks under {prefix!r} are not numbered 0..n-1: {sorted(found)}")
    return len(found)


def canonical_name(model: str) -> tuple[str, bool]:
    """('ViT-B-32', quickgelu?) from 'ViT-B/32', 'ViT-B-32-quickgelu', ..."""
    name = model.replace("/", "-")
    quick = name.endswith("-quickgelu")
    return (name[: -len("-quickgelu")] if quick else name), quick


def infer_sizes(sd: dict) -> dict:
    """config.model sizes read off the tensor shapes (heads are width / 64, as in every release)."""
    for key in (
        "visual.conv1.weight",
        "visual.positional_embedding",
        "token_embedding.weight",
        "positional_embedding",
        "text_projection",
        "visual.proj",
        "ln_final.weight",
    ):
        if key not in sd:
            raise ConversionError(
                f"checkpoint has no {key!r}: not an OpenAI/open_clip ViT CLIP "
                f"(ResNet and custom-text models are not supported)"
            )
    width, channels, patch, patch_w = sd["visual.conv1.weight"].shape
    if channels != 3 or patch != patch_w:
        raise ConversionError(
            f"visual.conv1.weight has shape {sd['visual.conv1.weight'].shape}; expected (width, 3, p, p)"
        )
    grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    if grid * grid + 1 != sd["visual.positional_embedding"].shape[0]:
        raise ConversionError("visual.positional_embedding rows are not grid*grid+1")
    text_width = sd["ln_final.weight"].shape[0]
    return dict(
        image_size=grid * patch,
        patch_size=patch,
        vision_width=width,
        vision_layers=_count_blocks(sd, "visual.transformer.resblocks."),
        vision_heads=max(width // 64, 1),
        text_width=text_width,
        text_layers=_count_blocks(sd, "transformer.resblocks."),
        text_heads=max(text_width // 64, 1),
        embed_dim=sd["text_projection"].shape[1],
        mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
    ), dict(
        vocab_size=sd["token_embedding.weight"].shape[0], context_length=sd["positional_embedding"].shape[0]
    )


def build_config(
    sd: dict,
    *,
    source: str,
    model: str,
    merges_file: str = "open_clip",
    activation: str | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
):
    """The workdir config for a checkpoint: shapes from the weights, activation from the source.

    A known `model` name (ViT-B-32, ViT-B-16, ViT-L-14) is checked against the weights.
    """
    if source not in SOURCES:
        raise ConversionError(f"--source must be one of {SOURCES}, got {source!r}")
    name, quick = canonical_name(model)
    sizes, text = infer_sizes(sd)
    if vision_heads:
        sizes["vision_heads"] = vision_heads
    if text_heads:
        sizes["text_heads"] = text_heads
    if name in defaults.VIT_SIZES:
        for key, expected in defaults.VIT_SIZES[name].items():
            if key != "image_size" and sizes[key] != expected:  # @336 variants differ only there
                raise ConversionError(
                    f"--model {model}: expects {key}={expected} but the checkpoint has {sizes[key]}"
                )
    if activation is None:
        activation = "quick_gelu" if source == "openai" or quick else "gelu"
    loss = "sigmoid" if "logit_bias" in sd else "softmax"
    cfg = defaults.clip_config(
        defaults.model_config(name=model, activation=activation, ln_eps=1e-5, loss=loss, **sizes),
        defaults.text_config(merges_file=merges_file, **text),
    )
    cfg.compute_dtype = "float32"
    cfg.scan_layers = True
    return cfg


# ----------------------------------------------------------------------------------------------
# Tensor mapping.


def _block(sd: dict, prefix: str, heads: int) -> dict:
    def get(name):
        key = prefix + name
        if key not in sd:
            raise ConversionError(f"checkpoint has no {key!r}")
        return np.asarray(sd[key], np.float32)

    w_in, b_in = get("attn.in_proj_weight"), get("attn.in_proj_bias")
    width = w_in.shape[1]
    head_dim = width // heads
    attn = {}
    for i, name in enumerate("qkv"):  # rows of in_proj are q, k, v; each (out, in)
        w = w_in[i * width : (i + 1) * width]
        attn[f"{name}_kernel"] = w.T.reshape(width, heads, head_dim)
        attn[f"{name}_bias"] = b_in[i * width : (i + 1) * width].reshape(heads, head_dim)
    attn["out_kernel"] = get("attn.out_proj.weight").T.reshape(heads, head_dim, width)
    attn["out_bias"] = get("attn.out_proj.bias")
    return {
        "ln_1": {"scale": get("ln_1.weight"), "bias": get("ln_1.bias")},
        "attn": attn,
        "ln_2": {"scale": get("ln_2.weight"), "bias": get("ln_2.bias")},
        "mlp": {
            "fc_kernel": get("mlp.c_fc.weight").T,
            "fc_bias": get("mlp.c_fc.bias"),
            "proj_kernel": get("mlp.c_proj.weight").T,
            "proj_bias": get("mlp.c_proj.bias"),
        },
    }


def _stack(sd: dict, prefix: str, layers: int, heads: int, scan: bool) -> dict:
    blocks = [_block(sd, f"{prefix}{i}.", heads) for i in range(layers)]
    if not scan:
        return {f"layer_{i}": b for i, b in enumerate(blocks)}
    return {"scan": {"block": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}}


def _ln(sd: dict, prefix: str) -> dict:
    return {
        "scale": np.asarray(sd[prefix + ".weight"], np.float32),
        "bias": np.asarray(sd[prefix + ".bias"], np.float32),
    }


def convert_state_dict(sd: dict, config) -> dict:
    """OpenAI/open_clip state_dict -> the params tree of clip_jax.model.CLIP (numpy float32)."""
    m = config.model
    scan = bool(config.scan_layers)
    used = set()

    def take(key):
        if key not in sd:
            raise ConversionError(f"checkpoint has no {key!r}")
        used.add(key)
        return np.asarray(sd[key], np.float32)

    conv = take("visual.conv1.weight")  # (W, 3, p, p) -> (p, p, 3, W) -> [p*p*3, W]
    p = conv.shape[-1]
    visual = {
        "patch_kernel": conv.transpose(2, 3, 1, 0).reshape(p * p * 3, conv.shape[0]),
        "class_embedding": take("visual.class_embedding"),
        "positional_embedding": take("visual.positional_embedding"),
        "ln_pre": _ln(sd, "visual.ln_pre"),
        "ln_post": _ln(sd, "visual.ln_post"),
        "proj": take("visual.proj"),
        "transformer": _stack(sd, "visual.transformer.resblocks.", m.vision_layers, m.vision_heads, scan),
    }
    text = {
        "token_embedding": take("token_embedding.weight"),
        "positional_embedding": take("positional_embedding"),
        "ln_final": _ln(sd, "ln_final"),
        "text_projection": take("text_projection"),
        "transformer": _stack(sd, "transformer.resblocks.", m.text_layers, m.text_heads, scan),
    }
    params = {"visual": visual, "text": text, "logit_scale": take("logit_scale").reshape(())}
    if m.loss.startswith("sigmoid"):
        params["logit_bias"] = take("logit_bias").reshape(())
    block_prefixes = ("visual.transformer.resblocks.", "transformer.resblocks.")
    leftover = sorted(
        k
        for k in sd
        if k not in used
        and not k.startswith(block_prefixes)
        and not k.startswith(("visual.ln_pre.", "visual.ln_post.", "ln_final."))
        and k.split(".")[-1] not in IGNORED_KEYS
    )
    if leftover:
        raise ConversionError(
            f"checkpoint has weights this model has no place for: {leftover[:8]}"
            + (" ..." if len(leftover) > 8 else "")
        )
    return params


def check_against_model(params: dict, config) -> None:
    """Converted tree == the Flax init tree of `config` (names and shapes), else ConversionError."""

    expected = flax.traverse_util.flatten_dict(nn.meta.unbox(abstract_params(clip_from_config(config))))
    got = flax.traverse_util.flatten_dict(params)
    if set(expected) != set(got):
        missing = sorted("/".join(k) for k in set(expected) - set(got))
        extra = sorted("/".join(k) for k in set(got) - set(expected))
        raise ConversionError(
            f"converted params differ from the model: missing {missing[:5]}, extra {extra[:5]}"
        )
    for k, v in expected.items():
        if tuple(v.shape) != tuple(got[k].shape):
            raise ConversionError(f"{'/'.join(k)}: converted shape {got[k].shape}, model expects {v.shape}")


def convert(
    checkpoint: str,
    *,
    source: str,
    model: str,
    workdir: str,
    merges_file: str = "open_clip",
    trust_pickle: bool = False,
    check_tokenizer: bool = True,
    log=print,
):
    """Reads `checkpoint`, writes `workdir` (config.json + step-0 params). Returns the config."""

    sd = load_state_dict(checkpoint, trust_pickle=trust_pickle)
    config = build_config(sd, source=source, model=model, merges_file=merges_file)
    params = convert_state_dict(sd, config)
    check_against_model(params, config)
    if check_tokenizer:
        tokenizer = make_tokenizer(config, workdir)
        if tokenizer.vocab_size != config.text.vocab_size:
            raise ConversionError(
                f"the tokenizer ({tokenizer.path}) has {tokenizer.vocab_size} tokens "
                f"but the checkpoint's embedding has {config.text.vocab_size} rows"
            )
    save_params(workdir, config, params, step=0)
    n = sum(int(np.prod(v.shape)) for v in __import__("jax").tree.leaves(params))
    m = config.model
    log(
        f"converted {source} {model} ({n:,} params; image {m.image_size}, patch {m.patch_size}, "
        f"width {m.vision_width}x{m.vision_layers}, text {m.text_width}x{m.text_layers}, "
        f"embed {m.embed_dim}, {m.activation}) into {workdir}"
    )
    return config


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, choices=SOURCES)
    parser.add_argument("--checkpoint", required=True, help="state_dict / TorchScript / .safetensors / .npz")
    parser.add_argument(
        "--model",
        required=True,
        help="ViT-B-32, ViT-B-16, ViT-L-14 (add -quickgelu for open_clip quickgelu "
        "models); other names are taken as custom sizes read off the weights",
    )
    parser.add_argument("--workdir", required=True)
    parser.add_argument(
        "--merges_file",
        default="open_clip",
        help="CLIP BPE merges: 'open_clip' (the installed package's file) or a path",
    )
    parser.add_argument(
        "--trust_pickle",
        action="store_true",
        help="allow TorchScript archives and full-pickle saves (they run code)",
    )
    args = parser.parse_args(argv)
    try:
        check_workdir(args.workdir)
        convert(
            args.checkpoint,
            source=args.source,
            model=args.model,
            workdir=args.workdir,
            merges_file=args.merges_file,
            trust_pickle=args.trust_pickle,
        )
    except (ConversionError, ConfigError, FileNotFoundError) as e:
        fail(str(e))


if __name__ == "__main__":
    main()
