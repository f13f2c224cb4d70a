"""Input-pipeline throughput: webdataset shards of 256x256 JPEGs -> decode, resize/crop,
CLIP-normalise through make_iterator, for several worker counts. Prints one JSON object.

    .venv/bin/python bench/bench_loader.py --shards 4 --per_shard 256 --workers 0,1,2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from core_jax.data import default_data_config, image_ops, make_iterator  # noqa: E402


def write_shards(root: str, shards: int, per_shard: int, size: int) -> str:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    for s in range(shards):
        with tarfile.open(os.path.join(root, f"{s:05d}.tar"), "w") as tar:
            for i in range(per_shard):
                # Smooth noise plus detail: JPEG sizes close to photos (~20-30 KB at 256 px).
                img = Image.fromarray(np.roll(base, i, 0)).resize((size, size), Image.BICUBIC)
                arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 20, (size, size, 3))
                buf = io.BytesIO()
                Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
                for ext, payload in (("jpg", buf.getvalue()), ("txt", f"image {s} {i}".encode())):
                    info = tarfile.TarInfo(f"{s:05d}{i:05d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return os.path.join(root, f"{{00000..{shards - 1:05d}}}.tar")


def measure(urls, workers, image_size, batch, batches):
    cfg = default_data_config()
    cfg.update(dict(source="webdataset", urls=urls, num_workers=workers, prefetch=2, shuffle_buffer=256))

    def example_fn(raw, rng):
        img = image_ops.resize_and_crop(raw["image"], image_size, True, rng)
        return {"image": image_ops.clip_normalize(image_ops.maybe_flip(img, rng))}

    it = make_iterator(
        cfg, "train", global_batch_size=batch, seed=0, example_fn=example_fn, process_index=0, process_count=1
    )
    next(it)  # threads started, pool warm
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    it.close()
    rate = batches * batch / seconds
    return {
        "workers": workers,
        "images_per_s": round(rate, 1),
        "images_per_s_per_worker": round(rate / max(workers, 1), 1),
        "seconds": round(seconds, 2),
        # Process CPU time (all threads) per image: comparable on a busy, shared machine.
        "cpu_ms_per_image": round(1000 * cpu / (batches * batch), 2),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--per_shard", type=int, default=128)
    ap.add_argument("--source_size", type=int, default=256)
    ap.add_argument("--image_size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        urls = write_shards(root, args.shards, args.per_shard, args.source_size)
        shard_mb = sum(os.path.getsize(os.path.join(root, f)) for f in os.listdir(root)) / 2**20
        results = [
            measure(urls, int(w), args.image_size, args.batch, args.batches) for w in args.workers.split(",")
        ]
    print(
        json.dumps(
            {
                "source": f"webdataset {args.shards}x{args.per_shard} "
                f"{args.source_size}px JPEG ({shard_mb:.1f} MiB)",
                "pipeline": f"decode + resize/random crop {args.image_size} + flip + CLIP normalise",
                "batch": args.batch,
                "cpu_count": os.cpu_count(),
                "load_avg_1m": round(os.getloadavg()[0], 1),
                "python": platform.python_version(),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
