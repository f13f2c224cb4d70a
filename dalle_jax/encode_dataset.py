"""Pre-encode a dataset into dVAE token shards, so transformer training skips the encoder.

    python -m dalle_jax.encode_dataset --dvae_workdir W --config configs/dalle_shapes.py --out_dir D

Reads `config.data` (source, splits) and, for each split, writes D/<split>-NNNNN.npz with
`tokens` int32 [N, grid, grid], `captions` and `keys` (unicode arrays; np.load needs no pickle),
plus D/index.json: {grid_size, vocab_size, image_size, dvae_workdir, splits: {split: {examples,
shards: [file, ...]}}}. Images are resized/centre-cropped to the dVAE's input size.

Several processes (every worker of a TPU pod through `launch/tpu_pod.py run`, or the
`--coordinator_address/--num_processes/--process_id` flags) share the work: each encodes its own
part of every split (the data pipeline's per-process slice) into D/<split>-pNNNN-NNNNN.npz and
D/index.pNNNN.json, and process 0 joins those into D/index.json once all have finished. D must be
a folder every process sees (a bucket or a shared filesystem).
"""

from __future__ import annotations

import json

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from core_jax import app as app_lib
from core_jax import distributed, storage
from core_jax.checkpoint import read_json
from core_jax.data import make_iterator
from core_jax.data.image_ops import resize_and_crop, to_float01
from core_jax.errors import RunError
from dalle_jax.dvae_api import DVAE

FLAGS = flags.FLAGS


def define_flags():
    """The tool's own flags, defined when it runs (not on import) so that importing it next to
    another tool with an --out_dir or --batch_size flag does not collide."""
    flags.DEFINE_string("dvae_workdir", None, "dVAE workdir (from train_dvae or convert_dvae).")
    flags.DEFINE_string("out_dir", None, "Output folder for the token shards and index.json.")
    flags.DEFINE_list(
        "splits", None, "Splits to encode (default: config.data.split and config.data.eval_split)."
    )
    flags.DEFINE_integer("shard_size", 8192, "Examples per .npz shard.")
    flags.DEFINE_integer("batch_size", 64, "Images per encoder call.")
    flags.DEFINE_integer(
        "max_examples", -1, "Stop each split after this many examples, per process (-1: all)."
    )
    flags.DEFINE_bool(
        "raw_weights",
        False,
        "Encode with the dVAE's raw trained weights, not their EMA (used by default when the run kept one).",
    )


def split_iterator(
    vae,
    data_config,
    split: str,
    *,
    batch_size: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
):
    """One pass over this process's part of `split` in order (`batch_size` images at a time),
    images resized to the dVAE's input. Building it opens the source (an index file, shards, a
    TFDS split), so a missing one fails here, before anything is written."""
    size = vae.image_size

    def example_fn(raw, rng):
        return {
            "image": to_float01(resize_and_crop(np.asarray(raw["image"]), size)),
            "caption": np.asarray(str(raw.get("caption", ""))),
            "key": np.asarray(str(raw.get("key", ""))),
        }

    return make_iterator(
        data_config,
        split,
        global_batch_size=batch_size * process_count,
        seed=seed,
        example_fn=example_fn,
        train=False,
        process_index=process_index,
        process_count=process_count,
    )


def shard_prefix(split: str, process_index: int, process_count: int) -> str:
    """File names of one process's shards start with this (the split alone for one process)."""
    return split if process_count == 1 else f"{split}-p{process_index:04d}"


def part_index_name(process_index: int) -> str:
    return f"index.p{process_index:04d}.json"


def merge_part_indexes(out_dir: str, process_count: int) -> dict:
    """index.json's content from the part index of every process: each split's examples summed,
    its shards listed process after process."""
    parts = [read_json(storage.join(out_dir, part_index_name(i))) for i in range(process_count)]
    merged = {k: v for k, v in parts[0].items() if k != "splits"}
    merged["splits"] = {}
    for split in parts[0]["splits"]:
        merged["splits"][split] = {
            "examples": sum(p["splits"][split]["examples"] for p in parts),
            "shards": [name for p in parts for name in p["splits"][split]["shards"]],
        }
    return merged


def encode_split(
    vae,
    data_config,
    split: str,
    out_dir: str,
    *,
    shard_size: int,
    batch_size: int,
    max_examples: int = -1,
    seed: int = 0,
    log=print,
    iterator=None,
    process_index: int = 0,
    process_count: int = 1,
) -> dict:
    """Encodes this process's part of one split (from `iterator` when given, a split_iterator
    already opened); returns {'examples': n, 'shards': [file names]}."""
    it = iterator or split_iterator(
        vae,
        data_config,
        split,
        batch_size=batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    prefix = shard_prefix(split, process_index, process_count)
    shards, pending, total = [], {"tokens": [], "captions": [], "keys": []}, 0

    def write(final=False):
        while len(pending["tokens"]) >= shard_size or (final and pending["tokens"]):
            n = min(shard_size, len(pending["tokens"]))
            name = f"{prefix}-{len(shards):05d}.npz"
            with storage.open(storage.join(out_dir, name), "wb") as f:
                np.savez(
                    f,
                    tokens=np.stack(pending["tokens"][:n]).astype(np.int32),
                    captions=np.asarray(pending["captions"][:n], dtype=str),
                    keys=np.asarray(pending["keys"][:n], dtype=str),
                )
            shards.append(name)
            for k in pending:
                del pending[k][:n]

    for batch in it:
        mask = batch.get("_mask", np.ones(len(batch["image"]), bool))
        tokens = np.asarray(vae.encode(batch["image"]))
        for i in np.flatnonzero(mask):
            if 0 <= max_examples <= total:
                break
            pending["tokens"].append(tokens[i])
            pending["captions"].append(str(batch["caption"][i]))
            pending["keys"].append(str(batch["key"][i]))
            total += 1
        write()
        if 0 <= max_examples <= total:
            break
    write(final=True)
    if it.skipped:
        log(f"{split}: skipped {dict(it.skipped)}")
    log(f"{split}: {total} examples in {len(shards)} shards")
    return {"examples": total, "shards": shards}


def main(argv):
    if len(argv) > 1:
        app_lib.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    for name in ("dvae_workdir", "out_dir"):
        if not getattr(FLAGS, name):
            app_lib.fail(f"--{name} is required")
    if FLAGS.shard_size <= 0 or FLAGS.batch_size <= 0:
        app_lib.fail("--shard_size and --batch_size must be positive")
    distributed.maybe_initialize()
    process_index, process_count = jax.process_index(), jax.process_count()
    config = app_lib.loaded_config()
    try:
        storage.check_reachable(FLAGS.dvae_workdir, FLAGS.out_dir)
    except ValueError as e:
        app_lib.fail(str(e))
    splits = FLAGS.splits or list(dict.fromkeys([config.data.split, config.data.eval_split]))

    try:
        vae = DVAE.load(FLAGS.dvae_workdir, raw_weights=FLAGS.raw_weights)
    except (FileNotFoundError, ValueError) as e:
        app_lib.fail(str(e))
    if int(config.data.image_size) != vae.image_size:
        print(
            f"note: config.data.image_size={config.data.image_size} but the dVAE takes "
            f"{vae.image_size}x{vae.image_size}; images are resized to the dVAE's size",
            flush=True,
        )
    seed = int(config.get("seed", 0))
    iterators = {}
    for split in splits:  # every source opens before the output folder exists
        try:
            iterators[split] = split_iterator(
                vae,
                config.data,
                split,
                batch_size=FLAGS.batch_size,
                seed=seed,
                process_index=process_index,
                process_count=process_count,
            )
        except (FileNotFoundError, ValueError) as e:
            app_lib.fail(f"split {split!r}: {e}")
    storage.makedirs(FLAGS.out_dir)
    index = {
        "grid_size": vae.grid_size,
        "vocab_size": vae.vocab_size,
        "image_size": vae.image_size,
        "dvae_workdir": storage.absolute(FLAGS.dvae_workdir),
        "splits": {},
    }
    for split in splits:
        try:
            index["splits"][split] = encode_split(
                vae,
                config.data,
                split,
                FLAGS.out_dir,
                shard_size=FLAGS.shard_size,
                batch_size=FLAGS.batch_size,
                max_examples=FLAGS.max_examples,
                iterator=iterators[split],
                process_index=process_index,
                process_count=process_count,
            )
        except (FileNotFoundError, ValueError, RunError) as e:
            app_lib.fail(f"split {split!r}: {e}")
    if process_count > 1:
        with storage.open(storage.join(FLAGS.out_dir, part_index_name(process_index)), "w") as f:
            json.dump(index, f, indent=2)
        # Process 0 joins the parts only once every process has written its own.
        multihost_utils.sync_global_devices("encode_dataset: part indexes written")
        if process_index != 0:
            return
        index = merge_part_indexes(FLAGS.out_dir, process_count)
    with storage.open(storage.join(FLAGS.out_dir, "index.json"), "w") as f:
        json.dump(index, f, indent=2)
    print(f"wrote {FLAGS.out_dir}/index.json", flush=True)


def cli():
    define_flags()
    app_lib.run(main, default_config=None, workdir_required=False)


if __name__ == "__main__":
    cli()
