"""Trains the DALL-E transformer: python -m dalle_jax.train --config configs/dalle_shapes.py --workdir DIR"""

from core_jax.app import run_trainer
from dalle_jax.dalle_task import make_task


def main():
    run_trainer(make_task, "configs/dalle_shapes.py", __doc__)


if __name__ == "__main__":
    main()
