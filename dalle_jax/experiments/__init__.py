"""Experiments: mechanisms that exist to win on the built-in shapes suite, not parts of any paper.

Each module here builds on a model module by composing or subclassing its pieces and is reached
from it only through that model's one selection hook (for the dVAE, `dalle_jax.dvae.experiment`).
Models never import this package otherwise; its results live in docs/results.md.
"""
