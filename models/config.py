"""The architecture description every model family is built from (one frozen dataclass).

Built from a Hugging Face ``config.json`` (through ``transformers.AutoConfig``) or from GGUF
metadata; both paths end in the same fields, so the model code never sees where weights came from.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``rope_type`` is ``default``, ``linear`` or ``llama3``."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer hyper-parameters (Llama / Mistral / Qwen2 / Qwen3 families)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: bias on q/k/v projections
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k before RoPE
    rope_scaling: RopeScaling = RopeScaling()
    hidden_act: str = "silu"
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads})"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling type {self.rope_scaling.rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )


def _rope_from_hf(hf: Any) -> tuple[float, RopeScaling]:
    """Read rope theta and scaling from either transformers 5 ``rope_parameters`` or 4.x fields."""
    params = getattr(hf, "rope_parameters", None)
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type dicts
        params = params["full_attention"]
    scaling = getattr(hf, "rope_scaling", None) if not params else params
    theta = getattr(hf, "rope_theta", None)
    if params and "rope_theta" in params:
        theta = params["rope_theta"]
    theta = float(theta if theta is not None else 10000.0)
    if not scaling:
        return theta, RopeScaling()
    rtype = scaling.get("rope_type", scaling.get("type", "default"))
    if rtype == "default":
        return theta, RopeScaling()
    return theta, RopeScaling(
        rope_type=rtype,
        factor=float(scaling.get("factor", 1.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
    )


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def model_config_from_hf(hf: Any) -> ModelConfig:
    """Translate a ``transformers`` PretrainedConfig into a ModelConfig."""
    archs = list(getattr(hf, "architectures", None) or [])
    if not archs:
        raise ValueError("config.json has no 'architectures' field; cannot choose a model class")
    theta, scaling = _rope_from_hf(hf)
    num_heads = int(hf.num_attention_heads)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
    model_type = getattr(hf, "model_type", "")
    sliding = getattr(hf, "sliding_window", None)
    if model_type in ("qwen2", "qwen3") and not getattr(hf, "use_sliding_window", False):
        sliding = None
    return ModelConfig(
        architecture=archs[0],
        vocab_size=int(hf.vocab_size),
        hidden_size=int(hf.hidden_size),
        intermediate_size=int(hf.intermediate_size),
        num_layers=int(hf.num_hidden_layers),
        num_heads=num_heads,
        num_kv_heads=int(getattr(hf, "num_key_value_heads", None) or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf.rms_norm_eps),
        rope_theta=theta,
        max_position_embeddings=int(getattr(hf, "max_position_embeddings", 2048)),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=bool(getattr(hf, "attention_bias", False)) or model_type == "qwen2",
        o_bias=bool(getattr(hf, "attention_bias", False)),
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        rope_scaling=scaling,
        hidden_act=str(getattr(hf, "hidden_act", "silu")),
        sliding_window=int(sliding) if sliding else None,
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_ids=_eos_ids(getattr(hf, "eos_token_id", None)),
    )
