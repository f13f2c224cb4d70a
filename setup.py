"""dalle_jax + clip_jax + core_jax: DALL-E, its dVAE and CLIP in JAX/Flax, from one CPU to a TPU pod."""

from setuptools import find_packages, setup

# The shipped configs: the repository's configs/ folder, installed as this package so that
# `--config clip_shapes` works from any directory (core_jax/config_files.py).
CONFIGS_PACKAGE = "dalle_clip_jax_configs"

# Every `python -m` entry point as a command: its top package and module name, `_` as `-`
# (dalle_jax.unclip's commands start with `unclip-`). A main that returns results for Python
# callers is reached through its module's `cli`, which exits 0. docs/install.md lists them.
CONSOLE_SCRIPTS = {
    "core-jax-aot": "core_jax.aot:cli",
    "core-jax-train-bpe": "core_jax.text.train_bpe:main",
    "clip-jax-train": "clip_jax.train:main",
    "clip-jax-evaluate": "clip_jax.evaluate:cli",
    "clip-jax-classify": "clip_jax.classify:cli",
    "clip-jax-embed": "clip_jax.embed:cli",
    "clip-jax-convert": "clip_jax.convert:main",
    "dalle-jax-train-dvae": "dalle_jax.train_dvae:main",
    "dalle-jax-reconstruct": "dalle_jax.reconstruct:main",
    "dalle-jax-encode-dataset": "dalle_jax.encode_dataset:cli",
    "dalle-jax-convert-dvae": "dalle_jax.convert_dvae:main",
    "dalle-jax-attach-decoder": "dalle_jax.attach_decoder:cli",
    "dalle-jax-train": "dalle_jax.train:main",
    "dalle-jax-generate": "dalle_jax.generate:cli",
    "dalle-jax-evaluate-fidelity": "dalle_jax.evaluate_fidelity:cli",
    "dalle-jax-contact-sheet": "dalle_jax.contact_sheet:main",
    "unclip-encode-embeddings": "dalle_jax.unclip.encode_embeddings:cli",
    "unclip-train-prior": "dalle_jax.unclip.train_prior:main",
    "unclip-train-decoder": "dalle_jax.unclip.train_decoder:main",
    "unclip-train-upsampler": "dalle_jax.unclip.train_upsampler:main",
    "unclip-generate": "dalle_jax.unclip.generate:cli",
    "unclip-vary": "dalle_jax.unclip.vary:cli",
}

setup(
    name="dalle-clip-jax",
    version="0.1.0",
    description="dVAE, DALL-E and CLIP training, sampling and evaluation in JAX/Flax",
    packages=find_packages(include=["core_jax*", "dalle_jax*", "clip_jax*"]) + [CONFIGS_PACKAGE],
    package_dir={CONFIGS_PACKAGE: "configs"},
    entry_points={"console_scripts": [f"{name} = {target}" for name, target in CONSOLE_SCRIPTS.items()]},
    python_requires=">=3.11",
    # Lower bounds are the versions tested here (Python 3.11 resolves jax 0.10.x, 3.12 jax 0.12.x).
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml_collections>=1.1.0",
        "absl-py>=2.1",
        "numpy>=2.0",
        "pillow>=11.0",
        "tokenizers>=0.21",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "pyarrow>=18.0",
        "tensorboardX>=2.6",
        "fsspec>=2024.1",
        "braceexpand>=0.1.7",
        "ftfy>=6.1",
    ],
    extras_require={
        # libtpu lets the aot test compile for a TPU slice on CPU (deviceless); setuptools lets
        # tests/test_package.py build the wheel offline; the bucket tests run a GCS emulator and
        # moto's S3 server on loopback and talk to them through gcsfs / s3fs.
        "test": [
            "pytest>=8.0",
            "setuptools>=61",
            "pytest-xdist>=3.6",
            "ruff>=0.6",
            "jax[tpu]>=0.10.2; sys_platform == 'linux' and platform_machine == 'x86_64'",
            "gcsfs>=2024.1",
            "s3fs>=2024.1",
            "gcp-storage-emulator>=2024.8",
            "moto[server]>=5.0",
            # tests/test_wandb_logging.py logs a run offline and reads it back.
            "wandb>=0.31",
        ],
        # Weight converters and parity tests only; never needed to train.
        "torch": ["torch>=2.1"],
        "tpu": ["jax[tpu]>=0.10.2"],
        "cuda": ["jax[cuda12]>=0.10.2"],
        # Workdirs, datasets and outputs on gs:// and s3://: fsspec opens those URLs through these.
        "gcs": ["gcsfs>=2024.1"],
        "s3": ["s3fs>=2024.1"],
        # Optional W&B logging (config.wandb.project); metrics.jsonl is written either way.
        "wandb": ["wandb>=0.31"],
    },
)
