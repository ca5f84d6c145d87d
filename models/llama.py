"""Llama family: Llama 2/3 (incl. ``llama3`` RoPE scaling), SmolLM2, Mistral (no sliding window)."""

from __future__ import annotations

from jaxserve.models.decoder import DecoderForCausalLM


class LlamaForCausalLM(DecoderForCausalLM):
    """Llama: no biases, untied or tied embeddings (SmolLM2 ties them)."""


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: the Llama block; a sliding window is only accepted when it covers max_model_len."""
