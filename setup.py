"""dalle_jax + clip_jax + core_jax: DALL-E, its dVAE and CLIP in JAX/Flax, from one CPU to a TPU pod."""

from setuptools import find_packages, setup

setup(
    name="dalle-clip-jax",
    version="0.1.0",
    description="dVAE, DALL-E and CLIP training, sampling and evaluation in JAX/Flax",
    packages=find_packages(include=["core_jax*", "dalle_jax*", "clip_jax*"]),
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
        # libtpu lets the aot test compile for a TPU slice on CPU (deviceless).
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            "jax[tpu]>=0.10.2; sys_platform == 'linux' and platform_machine == 'x86_64'",
        ],
        # Weight converters and parity tests only; never needed to train.
        "torch": ["torch>=2.1"],
        "tpu": ["jax[tpu]>=0.10.2"],
    },
)
