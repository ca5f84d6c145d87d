"""Read a GGUF file: model config from its metadata, dequantized tensors under HF names.

Tensors are dequantized with the ``gguf`` package (every type it supports). llama.cpp's
converter permutes the rows of q/k projections of Llama-architecture models so its RoPE can
rotate adjacent pairs; ``unpermute_qk`` restores HF's rotate-half order.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from jaxserve.models.config import ModelConfig, RopeScaling

# GGUF ``general.architecture`` -> HF architecture name.
GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# llama.cpp's converter permutes the q/k rows of these architectures for its RoPE layout (adjacent
# pairs); it stores Qwen weights in HF order (NeoX RoPE).
PERMUTED_QK_ARCHITECTURES = frozenset({"llama", "mistral"})

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """HF parameter name for a GGUF tensor name (None for tensors we do not use, e.g. rope_freqs)."""
    m = _LAYER_RE.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        mapped = _LAYER_NAMES.get(part)
        return None if mapped is None else f"model.layers.{layer}.{mapped}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    mapped = _GLOBAL_NAMES.get(base)
    return None if mapped is None else f"{mapped}.{kind}"


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of q/k rows: [n_heads * H, ...] back to rotate-half order."""
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


class _PlainArrayReader(gguf.GGUFReader):
    """gguf's reader over a plain ndarray view of its file mapping (no copy). Slicing a
    ``np.memmap`` runs Python code per slice (``memmap.__array_finalize__``), and the reader slices
    about a million times for a 49k-token vocabulary: SmolLM2's parse takes 3.3-3.7 s instead of
    15-17 s on the same (loaded) machine (docs/benchmarks.md §15, start-up)."""

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._data = np.asarray(value)


@functools.lru_cache(maxsize=2)
def open_gguf(path: Path) -> GGUFCheckpoint:
    """One parsed reader per file per process (parsing the tokenizer arrays takes seconds)."""
    return GGUFCheckpoint(path)


class GGUFCheckpoint:
    """An opened GGUF file: metadata, config and tensors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reader = _PlainArrayReader(str(path))
        self.arch = str(self.field("general.architecture"))
        if self.arch not in GGUF_ARCHITECTURES:
            raise ValueError(
                f"GGUF architecture {self.arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}"
            )

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def model_config(self) -> ModelConfig:
        """The ``ModelConfig`` from the file's ``{arch}.*`` metadata and tensor names (biases, QK norm, tied head).
        ValueError for RoPE scalings we do not rebuild (other than linear; a ``rope_freqs`` tensor)."""
        a = self.arch
        n_heads = int(self.field(f"{a}.attention.head_count"))
        hidden = int(self.field(f"{a}.embedding_length"))
        names = {t.name for t in self.reader.tensors}
        vocab = self.field(f"{a}.vocab_size")
        if vocab is None:
            vocab = len(self.reader.fields["tokenizer.ggml.tokens"].data)
        head_dim = self.field(f"{a}.attention.key_length") or self.field(f"{a}.rope.dimension_count")
        scaling_type = self.field(f"{a}.rope.scaling.type")
        scaling = RopeScaling()
        if scaling_type in ("linear",):
            scaling = RopeScaling(rope_type="linear", factor=float(self.field(f"{a}.rope.scaling.factor")))
        elif scaling_type not in (None, "none"):
            raise ValueError(f"GGUF rope scaling type {scaling_type!r} is not supported")
        if "rope_freqs.weight" in names:
            # Llama 3.1 GGUFs bake llama3 scaling into a rope_freqs tensor; we rebuild it from HF's rule.
            raise ValueError("GGUF files with a rope_freqs tensor (llama3 RoPE scaling) are not supported yet")
        eos = self.field("tokenizer.ggml.eos_token_id")
        bos = self.field("tokenizer.ggml.bos_token_id")
        arch_name = GGUF_ARCHITECTURES[a]
        return ModelConfig(
            architecture=arch_name,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(self.field(f"{a}.feed_forward_length")),
            num_layers=int(self.field(f"{a}.block_count")),
            num_heads=n_heads,
            num_kv_heads=int(self.field(f"{a}.attention.head_count_kv", n_heads)),
            head_dim=int(head_dim or hidden // n_heads),
            rms_norm_eps=float(self.field(f"{a}.attention.layer_norm_rms_epsilon")),
            rope_theta=float(self.field(f"{a}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(self.field(f"{a}.context_length", 2048)),
            tie_word_embeddings="output.weight" not in names,
            qkv_bias="blk.0.attn_q.bias" in names,
            o_bias="blk.0.attn_output.bias" in names,
            qk_norm="blk.0.attn_q_norm.weight" in names,
            rope_scaling=scaling,
            sliding_window=None,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=() if eos is None else (int(eos),),
        )

    def num_tensors(self) -> int:
        return len(self.reader.tensors)

    def iter_tensors(self, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (HF name, float32 array in HF layout [out, in]) for every used tensor."""
        permute = self.arch in PERMUTED_QK_ARCHITECTURES
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is None:
                continue
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            # GGUF dims are listed fastest-first; numpy data is already [out, in] after dequantize.
            w = w.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
            if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
                w = unpermute_qk(w, cfg.num_heads)
            elif permute and name.endswith(("k_proj.weight", "k_proj.bias")):
                w = unpermute_qk(w, cfg.num_kv_heads)
            yield name, w
