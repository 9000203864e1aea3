"""Checkpoint converters: a pretrained checkpoint from local files -> a tigerfg_jax
workdir that training starts from (`python -m tigerfg_jax.convert`, see `clip`)."""
