"""Where metrics go: metrics.jsonl, TensorBoard, PNG images, and a console progress line."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from core_jax import storage
from core_jax.errors import write_error
from core_jax.mirror import Mirror

# Dense bf16 peak per chip, for MFU on accelerators. CPUs are measured instead (see peak_flops).
PEAK_FLOPS_PER_CHIP = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
}


def measure_matmul_flops(dtype="float32", n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of a large matrix product through JAX on the default device (the machine's peak here)."""

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


_cpu_peaks: dict[str, float] = {}


def peak_flops(devices, compute_dtype: str = "float32") -> float:
    """Peak FLOP/s of all `devices` together: a table for accelerators, a measurement on CPU
    (once per process and dtype: the cores do not change between runs, and a second measurement
    would cost each run a second of matmuls and move its MFU with whatever else the machine runs)."""
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        # Fake CPU devices share the same cores, so the whole machine's peak is one measurement.
        if compute_dtype not in _cpu_peaks:
            _cpu_peaks[compute_dtype] = measure_matmul_flops(compute_dtype)
        return _cpu_peaks[compute_dtype]
    for name, flops in PEAK_FLOPS_PER_CHIP.items():
        if name.lower() in kind.lower():
            return flops * len(devices)
    return 0.0


def _scalar(v):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()


class MetricsWriter:
    """Writes one JSON object per logged step; only the main process writes (others are no-ops).
    A refused write (a full disk) raises a one-line RunError naming the file and the errno.
    `wandb_run` (core_jax.wandb_log.start) gets every row too, at the same step."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True, wandb_run=None):
        self.workdir = workdir
        self.enabled = enabled
        self._tb = None
        self._wandb = wandb_run if enabled else None
        self._jsonl = None
        self._mirror = None
        if not enabled:
            return
        self.path = storage.join(workdir, "metrics.jsonl")
        try:
            # On a bucket these append-only files are written in a local cache and uploaded whole.
            self._mirror = Mirror(workdir, download=("metrics.jsonl",))
            self._jsonl = open(os.path.join(self._mirror.local, "metrics.jsonl"), "a")
        except OSError as e:
            raise write_error(e.filename or self.path, e.errno, str(e)) from None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter  # lazy: optional, see the except below

                self._tb = SummaryWriter(logdir=os.path.join(self._mirror.local, "tensorboard"))
            except ImportError:  # TensorBoard is optional; metrics.jsonl is the record
                self._tb = None

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _scalar(v) for k, v in scalars.items()})
        try:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        except OSError as e:
            raise write_error(self.path, e.errno, str(e)) from None
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=int(step))
        self._sync()

    def _sync(self) -> None:
        if self._mirror.remote:
            if self._tb is not None:
                self._tb.flush()
            self._mirror.sync()

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """uint8 [H, W, 3] images -> WORKDIR/images/<name>_<step>.png and TensorBoard."""
        if not self.enabled:
            return

        d = storage.join(self.workdir, "images")
        for name, img in images.items():
            img = np.asarray(img)
            path = storage.join(d, f"{name.replace('/', '_')}_{step:07d}.png")
            try:
                storage.makedirs(d)
                storage.write_png(path, img)
            except OSError as e:
                raise write_error(path, e.errno, str(e)) from None
            if self._tb is not None:
                self._tb.add_image(name, img, step, dataformats="HWC")
        self._sync()

    def close(self) -> None:
        if self._jsonl is not None:
            # Every row was flushed as it was written: closing loses nothing, and must not hide
            # the write error that stopped the run behind a second one.
            try:
                self._jsonl.close()
            except OSError:
                pass
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mirror is not None:
            try:
                self._mirror.sync()
            finally:
                self._mirror.close()


def image_grid(images: np.ndarray, rows: int | None = None, pad: int = 2) -> np.ndarray:
    """[N, H, W, 3] uint8 -> one [rows*(H+pad), cols*(W+pad), 3] uint8 grid."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    cols = int(math.ceil(math.sqrt(n))) if rows is None else int(math.ceil(n / rows))
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = (
            images[i]
        )
    return grid


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total: int, scalars: Mapping[str, float], eta_seconds: float) -> str:
    parts = [f"step {step}/{total}"]
    for key, fmt in (
        ("loss", "{:.4f}"),
        ("learning_rate", "lr {:.2e}"),
        ("examples_per_sec", "{:.1f} ex/s"),
        ("mfu", "mfu {:.1%}"),
    ):
        if key in scalars and scalars[key] is not None:
            text = fmt.format(scalars[key])
            parts.append(f"loss {text}" if key == "loss" else text)
    parts.append(f"eta {format_duration(eta_seconds)}")
    return " | ".join(parts)


def print_progress(line: str) -> None:
    print(line, file=sys.stdout, flush=True)
