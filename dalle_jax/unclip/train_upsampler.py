"""Train an unCLIP upsampler:

python -m dalle_jax.unclip.train_upsampler --config configs/unclip_upsampler_shapes.py --workdir UW
"""

from core_jax.app import run_trainer
from dalle_jax.unclip.upsampler_task import make_task


def main():
    run_trainer(make_task, "configs/unclip_upsampler_shapes.py", __doc__)


if __name__ == "__main__":
    main()
