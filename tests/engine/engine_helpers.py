"""Building small engines for tests."""

from __future__ import annotations

from pathlib import Path

from jaxserve.config import ServeConfig
from jaxserve.engine.llm_engine import LLMEngine

_ENGINES: dict[tuple, LLMEngine] = {}


def make_engine(model: Path | str, **overrides) -> LLMEngine:
    """An engine on CPU with small buckets and a 64 MiB KV cache; identical configs share one engine
    (compiles are slow)."""
    values = dict(
        model=str(model), max_num_seqs=4, max_num_batched_tokens=32, block_size=4,
        max_model_len=256, compilation_cache_dir="", dtype="float32", kv_cache_memory_gib=0.0625,
    )
    values.update(overrides)
    key = tuple(sorted(values.items()))
    engine = _ENGINES.get(key)
    if engine is None or engine.has_unfinished():
        engine = LLMEngine(ServeConfig(**values), progress=False)
        _ENGINES[key] = engine
    return engine
