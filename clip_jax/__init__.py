"""CLIP in JAX/Flax: model (model.py), losses, trainer task, inference API (api.py), converters.

Kept import-light: `import clip_jax.api` etc. pull in jax/flax only when used.
"""
