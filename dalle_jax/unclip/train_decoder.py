"""Train the unCLIP decoder:

    python -m dalle_jax.unclip.train_decoder --config configs/unclip_decoder_shapes.py \\
        --config.clip_workdir=CW --workdir DW
"""

from core_jax.app import run_trainer
from dalle_jax.unclip.decoder_task import make_task


def main():
    run_trainer(make_task, "configs/unclip_decoder_shapes.py", __doc__)


if __name__ == "__main__":
    main()
