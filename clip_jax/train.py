"""Train CLIP: python -m clip_jax.train --config configs/clip_shapes.py --workdir /tmp/clip_shapes"""

from core_jax.app import run_trainer

from clip_jax.task import make_task


def main():
    run_trainer(make_task, "configs/clip_shapes.py", __doc__)


if __name__ == "__main__":
    main()
