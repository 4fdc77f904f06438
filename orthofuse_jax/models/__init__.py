"""Flax SDXL integration (optional extra ``orthofuse-jax[sdxl]``)."""
