"""Experiments: mechanisms that exist to win on the built-in shapes suite, not parts of any paper.

Each module here builds on a model module by composing or subclassing its pieces; one builder
module above both chooses between them (for the dVAE, `dalle_jax.dvae_models`). Models never
import this package; its results live in docs/results.md.
"""
