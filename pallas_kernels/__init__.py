"""Pallas kernels for CUDA GPUs, each with a pure-jnp reference beside it."""
