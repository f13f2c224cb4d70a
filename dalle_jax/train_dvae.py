"""Train the dVAE: `python -m dalle_jax.train_dvae --config configs/dvae_shapes.py --workdir W`."""

from core_jax.app import run_trainer
from dalle_jax.dvae_task import make_task


def main():
    run_trainer(make_task, "configs/dvae_shapes.py", __doc__)


if __name__ == "__main__":
    main()
