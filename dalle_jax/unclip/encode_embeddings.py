"""Pre-compute CLIP embeddings into shards, so a diffusion prior trains without the CLIP image tower.

    python -m dalle_jax.unclip.encode_embeddings --clip_workdir CW --out_dir D \\
        [--split train[,test_unseen]] [--num_examples N] [--config FILE]

Reads `config.data` of --config (default: the CLIP's own training data, from its config.json) and,
for each split, writes D/<split>-NNNNN.npz with `image_embedding` and `text_embedding` float32
[n, E] (L2-normalised), `text` int32 [n, L] (the captions' CLIP tokens), `captions` and `keys`,
plus D/index.json ({clip_dim, text_length, clip_workdir, clip_step, splits}) and, from the
training split (`data.split`) when it is among them, D/embedding_stats.npz: the per-dimension
statistics a prior run on these shards (`--config.data.embeddings_dir=D`) standardises with.
Images are resized / centre-cropped to the CLIP's input size. One process.
"""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
from absl import flags

from clip_jax.api import CLIPModel
from core_jax import app as app_lib
from core_jax import checkpoint, storage
from core_jax.data import make_iterator
from core_jax.data.embedding_shards import INDEX_FILE
from core_jax.data.image_ops import clip_normalize, resize_and_crop
from core_jax.errors import RunError
from core_jax.workdir_kinds import read_workdir_config
from dalle_jax.unclip import embedding_stats
from dalle_jax.unclip.prior_task import clip_embeddings

CLIP_TASK = "clip_jax.task"

FLAGS = flags.FLAGS


def define_flags():
    """The tool's own flags, defined when it runs (not on import): dalle_jax.encode_dataset has
    flags of the same names, and both may be imported into one process."""
    flags.DEFINE_string("clip_workdir", None, "CLIP workdir (from clip_jax.train or clip_jax.convert).")
    flags.DEFINE_string("out_dir", None, "Output folder for the shards, index.json and the statistics.")
    flags.DEFINE_list("split", None, "Splits to encode (default: config.data.split).")
    flags.DEFINE_integer("num_examples", -1, "Stop each split after this many examples (-1: all).")
    flags.DEFINE_integer("shard_size", 8192, "Examples per .npz shard.")
    flags.DEFINE_integer("batch_size", 64, "Examples per CLIP call.")
    flags.DEFINE_bool("raw_weights", False, "Use the CLIP's raw trained weights, not their EMA.")


def split_iterator(clip: CLIPModel, data_config, split: str, *, batch_size: int):
    """One pass over `split` in order: images resized to the CLIP's input, captions tokenized.
    Building it opens the source (an index file, shards, a TFDS split), so a missing one fails
    here, before anything is written."""
    size = clip.image_size

    def example_fn(raw, rng):
        caption = str(raw.get("caption", "") or "")
        return {
            "image": resize_and_crop(np.asarray(raw["image"]), size),
            "text": np.asarray(clip.tokenizer.encode([caption])[0], np.int32),
            "caption": np.asarray(caption),
            "key": np.asarray(str(raw.get("key", ""))),
        }

    return make_iterator(
        data_config,
        split,
        global_batch_size=batch_size,
        seed=0,
        example_fn=example_fn,
        train=False,
        process_index=0,
        process_count=1,
    )


def encode_split(
    clip: CLIPModel,
    data_config,
    split: str,
    out_dir: str,
    *,
    shard_size: int,
    batch_size: int,
    num_examples: int = -1,
    log=print,
    iterator=None,
) -> tuple[dict, dict]:
    """Encodes one split (from `iterator` when given, a split_iterator already opened); returns
    ({'examples': n, 'shards': [file names]}, the split's embedding_stats.StatsAccumulator)."""
    encode = jax.jit(functools.partial(clip_embeddings, clip.module))
    it = iterator or split_iterator(clip, data_config, split, batch_size=batch_size)
    columns = ("image_embedding", "text_embedding", "text", "captions", "keys")
    pending = {key: [] for key in columns}
    stats = embedding_stats.StatsAccumulator()
    shards, total = [], 0

    def write(final=False):
        while len(pending["keys"]) >= shard_size or (final and pending["keys"]):
            n = min(shard_size, len(pending["keys"]))
            name = f"{split}-{len(shards):05d}.npz"
            arrays = {key: np.stack(pending[key][:n]) for key in columns[:3]}
            with storage.open(storage.join(out_dir, name), "wb") as f:
                np.savez(
                    f,
                    image_embedding=arrays["image_embedding"].astype(np.float32),
                    text_embedding=arrays["text_embedding"].astype(np.float32),
                    text=arrays["text"].astype(np.int32),
                    captions=np.asarray(pending["captions"][:n], dtype=str),
                    keys=np.asarray(pending["keys"][:n], dtype=str),
                )
            shards.append(name)
            for key in pending:
                del pending[key][:n]

    try:
        for batch in it:
            mask = batch.get("_mask", np.ones(len(batch["image"]), bool))
            _, _, text, image = (
                np.asarray(a) for a in encode(clip.params, batch["text"], clip_normalize(batch["image"]))
            )
            for i in np.flatnonzero(mask):
                if 0 <= num_examples <= total:
                    break
                for key, value in (
                    ("image_embedding", image[i]),
                    ("text_embedding", text[i]),
                    ("text", batch["text"][i]),
                    ("captions", str(batch["caption"][i])),
                    ("keys", str(batch["key"][i])),
                ):
                    pending[key].append(np.asarray(value) if key not in ("captions", "keys") else value)
                stats.add(image[i : i + 1], text[i : i + 1])
                total += 1
            write()
            if 0 <= num_examples <= total:
                break
        write(final=True)
    finally:
        it.close()
    if it.skipped:
        log(f"{split}: skipped {dict(it.skipped)}")
    log(f"{split}: {total} examples in {len(shards)} shards")
    return {"examples": total, "shards": shards}, stats


def main(argv):
    if len(argv) > 1:
        app_lib.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    for name in ("clip_workdir", "out_dir"):
        if not getattr(FLAGS, name):
            app_lib.fail(f"--{name} is required")
    if FLAGS.shard_size <= 0 or FLAGS.batch_size <= 0:
        app_lib.fail("--shard_size and --batch_size must be positive")
    try:
        storage.check_reachable(FLAGS.clip_workdir, FLAGS.out_dir)
        clip_config = read_workdir_config(FLAGS.clip_workdir, CLIP_TASK)
        clip_step = checkpoint.latest_step(FLAGS.clip_workdir)
        if clip_step is None:
            raise ValueError(f"{FLAGS.clip_workdir} holds no checkpoint")
        clip = CLIPModel.load(FLAGS.clip_workdir, clip_step, raw_weights=FLAGS.raw_weights)
    except (FileNotFoundError, ValueError) as e:
        app_lib.fail(f"--clip_workdir: {e}")
    data_config = FLAGS.config.data if FLAGS.config is not None else clip_config.data
    splits = FLAGS.split or [str(data_config.split)]
    iterators = {}
    for split in splits:  # every source opens before the output folder exists
        try:
            iterators[split] = split_iterator(clip, data_config, split, batch_size=FLAGS.batch_size)
        except (FileNotFoundError, ValueError) as e:
            app_lib.fail(f"split {split!r}: {e}")
    storage.makedirs(FLAGS.out_dir)
    index = {
        "clip_dim": clip.embed_dim,
        "text_length": int(clip.config.text.context_length),
        "clip_workdir": storage.absolute(FLAGS.clip_workdir),
        "clip_step": int(clip_step),
        "splits": {},
    }
    for split in splits:
        try:
            index["splits"][split], stats = encode_split(
                clip,
                data_config,
                split,
                FLAGS.out_dir,
                shard_size=FLAGS.shard_size,
                batch_size=FLAGS.batch_size,
                num_examples=FLAGS.num_examples,
                iterator=iterators[split],
            )
        except (FileNotFoundError, ValueError, RunError) as e:
            app_lib.fail(f"split {split!r}: {e}")
        if split == str(data_config.split) and stats.count >= 2:
            path = embedding_stats.save_stats(FLAGS.out_dir, dict(stats.result(), stats_split=split))
            print(f"wrote {path} ({stats.count} {split} examples)", flush=True)
    with storage.open(storage.join(FLAGS.out_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    print(f"wrote {FLAGS.out_dir}/{INDEX_FILE}", flush=True)


def cli():
    define_flags()
    app_lib.run(main, default_config=None, workdir_required=False)


if __name__ == "__main__":
    cli()
