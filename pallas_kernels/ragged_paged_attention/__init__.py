"""Ragged paged attention: metadata, pure-jnp reference (kernels plug in beside it)."""
