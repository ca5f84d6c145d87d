"""Qwen3: Llama block with an RMSNorm on every q and k head before RoPE; explicit head_dim."""

from __future__ import annotations

from jaxserve.models.decoder import DecoderForCausalLM


class Qwen3ForCausalLM(DecoderForCausalLM):
    """Qwen3: q/k RMSNorm (``qk_norm``), no q/k/v bias."""
