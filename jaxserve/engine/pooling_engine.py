"""A decoder embedder on the paged engine: each input is a prefill-only request, so prefix caching works.

``PoolingEngine`` is an ``LLMEngine`` (same loading, KV-cache sizing, scheduler, block manager with
prefix caching, start-up compilation) whose runner is a ``PoolingRunner`` (steps return pooled
vectors, not sampled ids) and whose step results land in ``PooledResults`` (a request finishes when
its prompt's last chunk has run). Prompts are chunked across steps like any prefill; full blocks
found in the prefix cache are not recomputed (the last token always is, and it carries the
vector). Only last-token pooling runs here (a cached prefix keeps no per-token states, as vLLM,
which caches prefixes only for last-token pooling); other poolings (mean, cls, max) stay on the
cache-free ``EmbeddingEngine`` (``build_embedding_engine`` picks).

It offers the ``EmbeddingEngine`` interface (``info``: an ``EmbedInfo``; ``embed``), so
``AsyncEmbeddingEngine`` hosts either unchanged; sampling settings never reach it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

import jax
import numpy as np

from jaxserve.config import ServeConfig
from jaxserve.engine.compilation import BucketPolicy, mixed_row_floor
from jaxserve.engine.embedders import decoder_pooling, matryoshka_dimensions, uses_paged_engine
from jaxserve.engine.embedding_engine import EmbeddingEngine, EmbedInfo
from jaxserve.engine.llm_engine import LLMEngine, min_decode_batch
from jaxserve.engine.pooled_results import PooledOutput, PooledResults
from jaxserve.engine.pooling_runner import PoolingHandle, PoolingRunner
from jaxserve.engine.step_results import LaunchedStep
from jaxserve.models import ModelConfig
from jaxserve.models.bert import PoolingConfig
from jaxserve.request import Request
from jaxserve.sampling_params import SamplingParams
from jaxserve.weights.loader import LoadedModel
from jaxserve.weights.source import resolve_model_source

logger = logging.getLogger(__name__)

_NO_SAMPLING = SamplingParams()  # a Request needs one; a prefill-only request never reads it


@dataclasses.dataclass(frozen=True)
class _InflightPooling:
    launched: LaunchedStep
    handle: PoolingHandle


def build_embedding_engine(config: ServeConfig) -> PoolingEngine | EmbeddingEngine:
    """The engine for an ``embed`` model: paged for a last-token decoder embedder, else cache-free."""
    if uses_paged_engine(config, resolve_model_source(config.model)):
        return PoolingEngine(config)
    return EmbeddingEngine(config)


class PoolingEngine(LLMEngine):
    """Prefill-only requests over the paged KV cache; one pooled vector each (module docstring)."""

    def __init__(self, config: ServeConfig, *, progress: bool = False) -> None:
        source = resolve_model_source(config.model)
        pooling, self._default_len = decoder_pooling(config, source)
        self.pooling: PoolingConfig = pooling
        super().__init__(config, progress=progress)
        self.pooled = PooledResults(self.scheduler, self.counters)
        self._ids = itertools.count()
        mc = self.model_config
        self.embed_info = EmbedInfo(self.tokenizer, self.max_model_len, mc.vocab_size, mc.hidden_size,
                                    matryoshka_dimensions(source))
        logger.info("paged embedder: %s pooling%s, max length %d, prefix caching %s", pooling.mode,
                    ", normalised" if pooling.normalize else "", self.max_model_len,
                    "on" if config.enable_prefix_caching else "off")

    def _resolve_max_model_len(self, config: ServeConfig, model_config: ModelConfig) -> int:  # type: ignore[override]
        """Without --max-model-len: the sentence-transformers max length, else min(positions, 8192) (the
        cache-free path's default, so both paths admit the same inputs)."""
        from jaxserve.engine.embedders import DECODER_DEFAULT_MAX_LEN

        if config.max_model_len is None:
            default = self._default_len or min(model_config.max_position_embeddings, DECODER_DEFAULT_MAX_LEN)
            config = dataclasses.replace(config, max_model_len=default)
        return LLMEngine._resolve_max_model_len(config, model_config)

    def _build_runner(self, loaded: LoadedModel, blocks: int, dtype: jax.numpy.dtype, platform: str,
                      backend: str) -> PoolingRunner:
        c = self.config
        return PoolingRunner(
            loaded, pooling=self.pooling, num_blocks=blocks, block_size=c.block_size,
            max_model_len=self.max_model_len, backend=backend,
            buckets=BucketPolicy(c.max_num_seqs, c.max_num_batched_tokens,
                                 min_decode_batch=min_decode_batch(dtype, platform), sampling=False,
                                 min_mixed_rows=mixed_row_floor(platform, c.max_num_seqs)),
        )

    @property
    def info(self) -> EmbedInfo:  # type: ignore[override]
        """What the server may read (the ``EmbeddingEngine`` interface)."""
        return self.embed_info

    def add_prompt(self, prompt_token_ids: list[int]) -> str:
        """Queue one input (``embedding_engine.check_inputs`` admitted it); returns its request id."""
        request_id = f"emb-{next(self._ids)}"
        req = Request(request_id, prompt_token_ids, _NO_SAMPLING, max_tokens=0)
        self.scheduler.add(req)
        self.requests[request_id] = req
        return request_id

    def step(self) -> list[PooledOutput]:  # type: ignore[override]
        """Dispatch the next step, then finish the previous one; returns the requests that finished.

        No token of a step feeds the next, so with async scheduling a step is always dispatched
        before the previous one's vectors are read.
        """
        prev, self._inflight = self._inflight, None
        sched = self.scheduler.schedule()
        step = None
        if sched.scheduled:
            step = _InflightPooling(self.results.launch(sched), self.runner.dispatch(sched.scheduled))
        outputs = self._finish(prev) if prev is not None else []
        if step is not None and not self.async_scheduling:
            outputs += self._finish(step)
            step = None
        self._inflight = step  # type: ignore[assignment]
        return outputs

    def _finish(self, step: _InflightPooling) -> list[PooledOutput]:  # type: ignore[override]
        outputs = self.pooled.apply(step.launched, self.runner.fetch(step.handle))
        for out in outputs:
            self.requests.pop(out.request_id, None)
        return outputs

    def embed(self, seqs: list[list[int]]) -> np.ndarray:
        """One float32 vector per sequence, in order (``check_inputs`` has admitted them)."""
        rows = {self.add_prompt(s): i for i, s in enumerate(seqs)}
        out = np.empty((len(seqs), self.model_config.hidden_size), np.float32)
        while self.has_unfinished():
            for o in self.step():
                out[rows[o.request_id]] = o.vector
        return out
