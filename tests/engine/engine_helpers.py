"""Building small engines for tests."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from jaxserve.config import ServeConfig
from jaxserve.engine.llm_engine import LLMEngine

# Each engine's compiled executables hold thousands of memory mappings (about 2,300 for the tiny
# lookback engine); keeping every engine of a session alive crossed Linux's 65,530-mapping limit
# (vm.max_map_count) and crashed XLA:CPU mid-compile. Only the most recent few are kept.
_ENGINES: OrderedDict[tuple, LLMEngine] = OrderedDict()
_KEEP = 4


def make_engine(model: Path | str, **overrides) -> LLMEngine:
    """An engine on CPU with small buckets and a 64 MiB KV cache; identical configs share one engine
    (compiles are slow); the least recently used beyond ``_KEEP`` are dropped."""
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
    _ENGINES.move_to_end(key)
    while len(_ENGINES) > _KEEP:
        _ENGINES.popitem(last=False)
    return engine
