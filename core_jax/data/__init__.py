"""Input pipeline: sources (shapes, tfds, webdataset, folder) -> per-process batches.

See docs/architecture.md ("Data contract") for the interface and docs/data.md for configs.
"""

from core_jax.data import image_ops
from core_jax.data.decode import NoUsableExamples, SkipExample
from core_jax.data.config import default_data_config
from core_jax.data.iterator import DataIterator, make_iterator

__all__ = [
    "DataIterator",
    "NoUsableExamples",
    "SkipExample",
    "default_data_config",
    "image_ops",
    "make_iterator",
]
