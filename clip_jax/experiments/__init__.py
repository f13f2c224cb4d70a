"""Experiments: mechanisms that exist to win on the built-in shapes suite, not parts of any paper.

Each module here builds on clip_jax/model.py by composing or subclassing its pieces; one builder
module above both chooses between them (`clip_jax.clip_models`). Models never import this
package; its results live in docs/results.md.
"""
