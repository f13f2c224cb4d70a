"""DALL-E in JAX: the dVAE image tokenizer, the transformer, sampling and reranking.

Kept free of imports so that `python -m dalle_jax.<command>` starts without loading jax twice over.
"""
