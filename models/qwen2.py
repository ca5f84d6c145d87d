"""Qwen2 / Qwen2.5: Llama block with biases on the q/k/v projections, often tied embeddings."""

from __future__ import annotations

from jaxserve.models.decoder import DecoderForCausalLM


class Qwen2ForCausalLM(DecoderForCausalLM):
    """Qwen2: q/k/v bias (set by ``model_config_from_hf`` for model_type qwen2)."""
