"""Train the unCLIP diffusion prior:

    python -m dalle_jax.unclip.train_prior --config configs/unclip_prior_shapes.py \\
        --config.clip_workdir=CW --workdir PW
"""

from core_jax.app import run_trainer
from dalle_jax.unclip.prior_task import make_task


def main():
    run_trainer(make_task, "configs/unclip_prior_shapes.py", __doc__)


if __name__ == "__main__":
    main()
