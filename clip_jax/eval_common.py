"""What CLIP's zero-shot and retrieval evaluations share: the `config.eval` keys, padded batches,
and the encoders. A leaf under clip_jax.evaluate (the CLI), zeroshot and retrieval, so those import
it at load time without a circle.

An *encoder* is anything with `embed_images(uint8 [B, S, S, 3]) -> [B, E]` and
`embed_texts(list[str]) -> [N, E]` (both L2-normalised), optionally `put(local_rows)` (host rows ->
a global, batch-sharded array) and `gather(array)` (the reverse). `clip_jax.api.CLIPModel` is one
(single process, arrays stay numpy); `ParamsEncoder` is the sharded one built from params.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax import clip_models
from clip_jax import model as clip_model
from core_jax import sharded_inference, sharding, storage
from core_jax.data.decode import SkipExample
from core_jax.data.image_ops import CLIP_MEAN, CLIP_STD, resize_and_crop
from core_jax.text import tokenizer_from_config
from core_jax.trainer import make_global_batch


def add_weights_flags(parser) -> None:
    """--workdir, --step and --raw_weights: which CLIP weights a tool loads."""
    parser.add_argument("--workdir", required=True, help="CLIP workdir (trained or converted)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    parser.add_argument(
        "--raw_weights",
        action="store_true",
        help="load the raw trained weights, not their EMA (used by default when the run kept one)",
    )


def eval_config(evaluators: str = "") -> ml_collections.ConfigDict:
    """The `config.eval` keys; CLIP configs add them with `config.eval = eval_config(...)`."""
    c = ml_collections.ConfigDict()
    c.evaluators = evaluators  # trainer evaluators, comma list: 'zeroshot', 'retrieval'; '' = none
    c.zeroshot_source = "shapes"  # shapes | tfds | '' (no zero-shot)
    c.zeroshot_name = "imagenet2012"  # TFDS builder (zeroshot_source='tfds')
    c.zeroshot_split = "test_seen"  # shapes: train|test_seen|test_unseen|test_ood; tfds: e.g. validation
    c.zeroshot_data_dir = ""  # TFDS data_dir; '' = config.data.data_dir
    c.zeroshot_label_key = "label"
    # '' = from the dataset (shapes names; TFDS label names; ImageNet's WordNet ids become the
    # shipped cleaned names); 'imagenet' = the shipped list; else a file with one name per line.
    c.classnames = ""
    # '' = default for the source (shapes: 'shapes'; tfds: 'openai80', the CLIP paper's 80);
    # 'openai80' | 'subset7' | 'shapes' | 'photo' | a file with one template ('{}') per line.
    c.templates = ""
    c.retrieval_split = ""  # split of config.data with captions; '' = no retrieval
    c.retrieval_max_captions = 5  # captions kept per image (COCO 5k protocol: the first 5)
    c.max_examples = 0  # 0 = the whole split
    c.batch_size = 64  # global images per step (rounded up to a multiple of the data-parallel size)
    return c


def with_eval_defaults(config) -> ml_collections.ConfigDict:
    """A copy of `config` whose `eval` has every key of eval_config() (workdir values win)."""
    config = ml_collections.ConfigDict(config.to_dict())
    merged = eval_config()
    if "eval" in config:
        for key, value in config.eval.items():
            merged[key] = value
    config.eval = merged
    return config


def _cast(text: str, old, key: str):
    if isinstance(old, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"--config.{key}: expected true/false, got {text!r}")
    try:
        if isinstance(old, int):
            return int(text)
        if isinstance(old, float):
            return float(text)
    except ValueError:
        raise ValueError(f"--config.{key}: expected {type(old).__name__}, got {text!r}") from None
    return text


def apply_overrides(config, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Applies `--config.a.b=value` items to `config` (in place); unknown keys are an error."""
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ValueError(f"unexpected argument {item!r}; overrides look like --config.eval.KEY=VALUE")
        dotted, text = item[len("--config.") :].split("=", 1)
        *parents, leaf = dotted.split(".")
        node = config
        for i, part in enumerate(parents):
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                section = ".".join(parents[: i + 1])
                raise ValueError(f"--config.{dotted}: config has no section {section}")
            node = node[part]
        if leaf not in node:
            known = ", ".join(sorted(node.keys()))
            raise ValueError(f"--config.{dotted}: unknown key {leaf!r} (known: {known})")
        node[leaf] = _cast(text, node[leaf], dotted)
    return config


# ----------------------------------------------------------------------------------------------
# Batching for sources the data iterator does not cover (the shapes one-object scenes).


def padded_batches(
    num_examples: int,
    load: Callable[[int], dict],
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    skipped: dict | None = None,
) -> Iterator[dict]:
    """One pass over examples 0..n-1 as this process's rows of global batches of `batch_size`.

    Global batch t holds examples [t*B, (t+1)*B); process p takes rows [p*b, (p+1)*b) of it
    (b = B / process_count), so every process yields the same number of batches. Rows past the
    end, and examples whose `load` raises SkipExample (counted in `skipped`), are padding:
    `_mask` is False there and their contents repeat a real row.
    """

    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by {process_count} processes")
    local = batch_size // process_count
    for start in range(0, num_examples, batch_size):
        rows, mask = [], []
        for i in range(start + process_index * local, start + (process_index + 1) * local):
            example = None
            if i < num_examples:
                try:
                    example = load(i)
                except SkipExample as e:
                    if skipped is not None:
                        skipped[e.reason] = skipped.get(e.reason, 0) + 1
            rows.append(example)
            mask.append(example is not None)
        filler = next((r for r in rows if r is not None), None)
        if filler is None:
            filler = _first_loadable(num_examples, load)
            if filler is None:
                return
        rows = [r if r is not None else filler for r in rows]
        batch = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in filler}
        batch["_mask"] = np.asarray(mask, bool)
        yield batch


def _first_loadable(num_examples, load):
    for i in range(num_examples):
        try:
            return load(i)
        except SkipExample:
            continue
    return None


def round_batch_size(batch_size: int, multiple: int) -> int:
    return int(math.ceil(max(1, int(batch_size)) / multiple) * multiple)


def read_lines(path: str, what: str) -> list[str]:
    """Non-blank, stripped lines of a text file; a missing or empty file is a ValueError."""
    if not storage.isfile(path):
        raise ValueError(f"{what} file not found: {path}")
    with storage.open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{what} file {path} is empty")
    return lines


def sized_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side (bicubic) and centre-crop to size x size; untouched when it fits."""
    return np.asarray(resize_and_crop(np.asarray(image, np.uint8), size, random_crop=False))


# ----------------------------------------------------------------------------------------------
# The sharded encoder over params (trainer evaluators and this CLI).


def _mesh_of(params):
    for leaf in jax.tree.leaves(params):
        s = getattr(leaf, "sharding", None)
        if isinstance(s, NamedSharding):
            return s.mesh
    return None


@functools.lru_cache(maxsize=8)
def _jitted_encoders(module):
    """Image and text encoders for one CLIP module, compiled once and shared by every call."""

    mean, std = jnp.asarray(CLIP_MEAN), jnp.asarray(CLIP_STD)

    def images_fn(params, images_uint8):
        # uint8 crosses host->device (4x less than float32); normalising is free on the device.
        x = (images_uint8.astype(jnp.float32) / 255.0 - mean) / std
        return clip_model.encode_image(module, params, x)

    def texts_fn(params, tokens):
        return clip_model.encode_text(module, params, tokens)

    return jax.jit(images_fn), jax.jit(texts_fn)


class ParamsEncoder:
    """Embeds with CLIP params; batches are split over the mesh's (data, fsdp) axes.

    The mesh is the one the params live on (the trainer's), else a data-parallel mesh over all
    devices with the params replicated on it (the CLI). Works multi-process: `put` takes this
    process's rows, `gather` returns all rows to every process.
    """

    def __init__(
        self, config, params, workdir: str | None = None, *, tokenizer=None, text_batch_size: int = 256
    ):
        module = clip_models.clip_from_config(config)
        self.spec = module.cfg
        self.image_size = int(self.spec.image_size)
        if tokenizer is None:
            tokenizer = tokenizer_from_config(
                config.text, workdir, data_source=config.get("data", {}).get("source")
            )
        self.tokenizer = tokenizer
        mesh = _mesh_of(params)
        if mesh is None:
            mesh = data_parallel_mesh()
            params = jax.device_put(params, NamedSharding(mesh, P()))
        self.mesh, self.params = mesh, params
        self.data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
        self.text_batch_size = round_batch_size(text_batch_size, self.data_parallel)
        self._images_fn, self._texts_fn = _jitted_encoders(module)

    def put(self, local_rows: np.ndarray):
        return make_global_batch(self.mesh, {"x": np.asarray(local_rows)})["x"]

    def gather(self, x) -> np.ndarray:
        """A batch-sharded global array -> all its rows on every process, in the order of
        `all_rows` (process-major: each process's rows as it passed them to `put`)."""
        if jax.process_count() == 1:
            return np.asarray(jax.device_get(x))
        spec = sharding.spec_for(("act_batch",) + (None,) * (x.ndim - 1), x.shape, self.mesh)
        local = multihost_utils.global_array_to_host_local_array(x, self.mesh, spec)
        return all_rows(np.asarray(local))

    def embed_images(self, images):
        """uint8 [b, S, S, 3] (this process's rows, or a global array) -> sharded [B, E]."""
        if not isinstance(images, jax.Array):
            images = self.put(images)
        with jax.set_mesh(self.mesh):
            return self._images_fn(self.params, images)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """[N, E] on every process (each process passes the same texts)."""
        n, b = len(texts), self.text_batch_size
        tokens = np.asarray(self.tokenizer.encode(list(texts)), np.int32)
        padded = np.concatenate([tokens, np.zeros(((-n) % b,) + tokens.shape[1:], np.int32)])
        local = b // jax.process_count()
        lo = jax.process_index() * local
        out = []
        with jax.set_mesh(self.mesh):
            for start in range(0, len(padded), b):
                chunk = self.put(padded[start + lo : start + lo + local])
                out.append(self.gather(self._texts_fn(self.params, chunk)))
        return np.concatenate(out)[:n] if out else np.zeros((0, self.spec.embed_dim), np.float32)


def data_parallel_mesh():
    """All devices of all processes on the `data` axis (evaluation keeps whole params per device)."""
    return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def load_clip_params(workdir: str, config, step: int | None, mesh, raw_weights: bool = False):
    """Params of `workdir` (its EMA when it kept one, unless `raw_weights`) restored straight onto
    their training shardings on `mesh` (replicated on a data-only mesh; None: one device). Works on
    every process: none reads into a device it cannot address."""

    module = clip_models.clip_from_config(config)
    init_fn = lambda: clip_model.init_params(module, jax.random.key(0))  # noqa: E731
    return sharded_inference.load_params(workdir, init_fn, mesh, step=step, ema=not raw_weights)[1]


def put_rows(encoder, rows: np.ndarray):
    return encoder.put(rows) if hasattr(encoder, "put") else np.asarray(rows)


def gather_rows(encoder, x) -> np.ndarray:
    return encoder.gather(x) if hasattr(encoder, "gather") else np.asarray(x)


def all_rows(local_rows) -> np.ndarray:
    """Host-local rows -> the rows of all processes, process-major (the global batch order)."""
    if jax.process_count() == 1:
        return np.asarray(local_rows)
    return np.asarray(multihost_utils.process_allgather(np.asarray(local_rows), tiled=True))


def encoder_batch_multiple(encoder) -> int:
    return int(getattr(encoder, "data_parallel", 1))
