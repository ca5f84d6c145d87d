"""The models an ``EmbeddingEngine`` runs: a BERT encoder, or a decoder (Llama / Qwen2 / Qwen3) used
as an embedder. Either is a graph, its parameters, a forward over right-padded ``[B, L]`` rows
giving token states, and the pooling read from the checkpoint (or ``--pooling`` for a decoder).

A decoder embedder with last-token pooling runs on the paged engine instead
(``engine/pooling_engine.py``: prefill-only requests, prefix caching); one with another pooling
(mean, cls, max: every token's state is needed) runs its causal forward here without a KV cache
(``DecoderForCausalLM.hidden_states``: dense causal attention under a key padding mask, positions
0..len-1), sharing the encoder's bucketed, compiled-at-start-up path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ServeConfig
from jaxserve.models.bert import PoolingConfig
from jaxserve.weights.encoder_loader import is_encoder_checkpoint, load_encoder
from jaxserve.weights.loader import DTYPES, load_model, read_model_config, resolve_dtype
from jaxserve.weights.sentence_transformers import read_sentence_transformers
from jaxserve.weights.source import ModelSource

logger = logging.getLogger(__name__)

DECODER_POOLING = {"last": "lasttoken", "mean": "mean"}  # --pooling -> PoolingConfig.mode
# A decoder embedder's default max length (its attention holds an [L, L] score matrix per head; a
# 32k-position checkpoint would need tens of GiB): Qwen3-Embedding's own examples use 8192.
DECODER_DEFAULT_MAX_LEN = 8192


@dataclasses.dataclass(frozen=True)
class Embedder:
    """A loaded embedding model: ``forward(model, ids_BL, mask_BL)`` gives token states [B, L, D]."""

    graphdef: nnx.GraphDef
    state: nnx.State
    forward: Callable[[Any, jax.Array, jax.Array], jax.Array]
    pooling: PoolingConfig
    positions: int  # the model's own position limit
    default_max_len: int | None  # without --max-model-len (None: ``positions``)
    vocab_size: int
    hidden_size: int
    pad_id: int
    matryoshka_dimensions: tuple[int, ...] | None


def load_embedder(config: ServeConfig, source: ModelSource) -> Embedder:
    """The encoder or decoder embedder of ``source`` on the default device."""
    if source.kind == "hf" and is_encoder_checkpoint(source.path):
        return _load_encoder(config, source)
    return _load_decoder(config, source)


def _load_encoder(config: ServeConfig, source: ModelSource) -> Embedder:
    st = read_sentence_transformers(source.path)
    dtype = jnp.float32 if config.dtype == "auto" else DTYPES[config.dtype]  # small: f32 by default
    enc = load_encoder(source.path, dtype, config.hf_overrides)
    cfg = enc.config
    return Embedder(enc.graphdef, enc.state, lambda m, ids, mask: m(ids, mask), st.pooling,
                    cfg.max_position_embeddings, st.max_seq_length, cfg.vocab_size, cfg.hidden_size,
                    cfg.pad_token_id or 0, cfg.matryoshka_dimensions)


def decoder_pooling(config: ServeConfig, source: ModelSource) -> tuple[PoolingConfig, int | None]:
    """A decoder embedder's pooling and sentence-transformers max length: ``--pooling`` (normalised),
    else the checkpoint's ``modules.json`` if it has one, else last token, normalised."""
    if config.pooling != "auto":
        return PoolingConfig(DECODER_POOLING[config.pooling], normalize=True), None
    if source.kind == "hf" and (source.path / "modules.json").is_file():
        st = read_sentence_transformers(source.path)
        return st.pooling, st.max_seq_length
    return PoolingConfig("lasttoken", normalize=True), None


def uses_paged_engine(config: ServeConfig, source: ModelSource) -> bool:
    """Whether an ``embed`` model runs on the paged engine (a decoder with last-token pooling: its KV
    cache and prefix caching) rather than the cache-free bucketed path."""
    if source.kind == "hf" and is_encoder_checkpoint(source.path):
        return False
    return decoder_pooling(config, source)[0].mode == "lasttoken"


def matryoshka_dimensions(source: ModelSource) -> tuple[int, ...] | None:
    """A decoder checkpoint's Matryoshka declaration (config.json), as ``EmbedInfo`` wants it."""
    path = source.path / "config.json" if source.kind == "hf" else None
    hf = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    dims = hf.get("matryoshka_dimensions")
    if dims:
        return tuple(int(d) for d in dims)
    return () if hf.get("is_matryoshka") else None


def _load_decoder(config: ServeConfig, source: ModelSource) -> Embedder:
    pooling, st_len = decoder_pooling(config, source)
    cfg, stored = read_model_config(source)
    platform = jax.default_backend()
    dtype = resolve_dtype(config.dtype, stored, platform)
    compute = jnp.float32 if platform == "cpu" else dtype
    loaded = load_model(source, cfg, dtype, compute_dtype=compute, progress=False,
                        dummy=config.load_format == "dummy")
    positions = cfg.max_position_embeddings
    return Embedder(loaded.graphdef, loaded.state, lambda m, ids, mask: m.hidden_states(ids, mask), pooling,
                    positions, st_len or min(positions, DECODER_DEFAULT_MAX_LEN), cfg.vocab_size, cfg.hidden_size, 0,
                    matryoshka_dimensions(source))
