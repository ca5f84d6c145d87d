"""jaxserve: a JAX-native LLM serving stack."""

__version__ = "0.1.0"
