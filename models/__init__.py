"""Flax (NNX) model families, chosen by the checkpoint's ``architectures`` field."""

from __future__ import annotations

from jaxserve.models.config import ModelConfig, model_config_from_hf
from jaxserve.models.decoder import DecoderForCausalLM
from jaxserve.models.llama import LlamaForCausalLM, MistralForCausalLM
from jaxserve.models.qwen2 import Qwen2ForCausalLM
from jaxserve.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[DecoderForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def model_class(architecture: str) -> type[DecoderForCausalLM]:
    """The model class for an HF ``architectures`` entry, or a ValueError naming the supported ones."""
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(MODEL_REGISTRY)}"
        ) from None


__all__ = [
    "MODEL_REGISTRY",
    "DecoderForCausalLM",
    "ModelConfig",
    "model_class",
    "model_config_from_hf",
]
