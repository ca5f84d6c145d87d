"""The OpenAI-compatible HTTP layer (FastAPI): protocol, routes, streaming, the engine bridge."""
