"""Checkpoint readers (safetensors directories, GGUF files) and the loader that fills a model."""
