"""Per-dimension standardisation of CLIP embeddings for the diffusion prior.

Why: the prior diffuses CLIP image embeddings, which are L2-normalised, so each of the E
dimensions has a spread of about 1 / sqrt(E) around a data-dependent mean, while the forward
process adds unit-variance noise to every dimension. Left as they are, the signal is gone long
before the last timestep and the schedule's SNR means nothing like what it says (the noise
schedule assumes data of about unit variance: Nichol & Dhariwal 2021, section 3.2; Ho et al. 2020
scale images to [-1, 1] for the same reason). Two fixes are in use: scaling by sqrt(E)
(DALLE2-pytorch's DiffusionPrior, `image_embed_scale`) and standardising each dimension with a
mean and standard deviation measured on the training data (Karlo, kakaobrain's unCLIP
reproduction: PriorDiffusionModel's `clip_mean` / `clip_std`). We standardise per dimension: it
also removes the mean, and one modality's CLIP embeddings lie in a narrow cone around theirs
(Liang et al. 2022, "Mind the Gap", section 3), so every dimension the network sees varies by
about 1 around 0 instead of by 1 / sqrt(E) around an offset.

The statistics are measured once, at the start of a run, on the training data, and stored in the
run's workdir (`STATS_FILE`): a resumed run and the inference API read them back, so the
network's input and output scale never changes under a trained model. Text embeddings, an input of
the network, get their own statistics the same way.
"""

from __future__ import annotations

import io

import numpy as np

from core_jax import storage

STATS_FILE = "embedding_stats.npz"
KEYS = ("image_mean", "image_std", "text_mean", "text_std")
# A floor on the per-dimension std: a dimension (nearly) constant over the data would otherwise
# be blown up to unit variance from rounding noise.
MIN_STD = 1e-4


class StatsAccumulator:
    """Running per-dimension sums of image and text embeddings, in float64 (unit-norm embeddings
    keep their digits in sum and sum of squares over any realistic N), so a dataset of any size is
    measured in one pass without holding it."""

    def __init__(self):
        self.count = 0
        self.sums: dict[str, np.ndarray] = {}

    def add(self, image_embeddings, text_embeddings) -> None:
        for name, x in (("image", image_embeddings), ("text", text_embeddings)):
            x = np.asarray(x, np.float64)
            if x.ndim != 2:
                raise ValueError(f"embedding statistics need [N, E] {name} embeddings, got {x.shape}")
            for key, value in ((f"{name}_sum", x.sum(0)), (f"{name}_sq", np.square(x).sum(0))):
                self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += len(np.asarray(image_embeddings))

    def result(self) -> dict[str, np.ndarray]:
        """Per-dimension means and standard deviations (float32 [E] each), and `count`."""
        if self.count < 2:
            raise ValueError(f"embedding statistics need at least 2 examples, got {self.count}")
        stats = {}
        for name in ("image", "text"):
            mean = self.sums[f"{name}_sum"] / self.count
            var = np.maximum(self.sums[f"{name}_sq"] / self.count - np.square(mean), 0.0)
            stats[f"{name}_mean"] = mean.astype(np.float32)
            stats[f"{name}_std"] = np.maximum(np.sqrt(var), MIN_STD).astype(np.float32)
        stats["count"] = np.int64(self.count)
        return stats


def compute_stats(image_embeddings, text_embeddings) -> dict[str, np.ndarray]:
    """StatsAccumulator's result for [N, E] image and text embeddings."""
    acc = StatsAccumulator()
    acc.add(image_embeddings, text_embeddings)
    return acc.result()


def stats_path(directory: str) -> str:
    return storage.join(directory, STATS_FILE)


def save_stats(directory: str, stats: dict) -> str:
    """Writes STATS_FILE into `directory` (through a temporary file, so a reader never sees half
    of one); returns its path."""
    buffer = io.BytesIO()
    np.savez(buffer, **{key: np.asarray(value) for key, value in stats.items()})
    path = stats_path(directory)
    storage.write_bytes(path, buffer.getvalue())
    return path


def load_stats(directory: str, clip_dim: int | None = None) -> dict[str, np.ndarray]:
    """The statistics stored in `directory` (KEYS, `count` and whatever else the writer added);
    FileNotFoundError when there are none, ValueError when the file is unreadable or (with
    `clip_dim`) of another embedding width."""
    path = stats_path(directory)
    if not storage.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as f:
            stats = {key: np.asarray(f[key]) for key in f.files}
        for key in (*KEYS, "count"):
            stats[key]  # noqa: B018  (a KeyError names the missing array)
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"{path}: not embedding statistics ({e})") from None
    widths = {stats[key].shape for key in KEYS}
    if len(widths) != 1 or (clip_dim is not None and widths != {(clip_dim,)}):
        raise ValueError(f"{path}: statistics of shapes {sorted(widths)}, expected ({clip_dim},)")
    return stats


def standardise(x, stats: dict, kind: str):
    """(x - mean) / std per dimension; kind 'image' or 'text'. Works on numpy and jax arrays."""
    return (x - stats[f"{kind}_mean"]) / stats[f"{kind}_std"]


def destandardise(x, stats: dict, kind: str = "image"):
    return x * stats[f"{kind}_std"] + stats[f"{kind}_mean"]
