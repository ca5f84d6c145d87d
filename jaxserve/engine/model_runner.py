"""The only engine part that touches the device: host batch -> padded arrays -> compiled step.

Every step shape is compiled ahead of time (``compile_all``) and executed through the compiled
executable itself, so serving can never trigger a compile: a batch that fits no compiled shape
raises instead. The KV-cache pages are donated to each step and updated in place.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.engine.compilation import BucketPolicy, StepShape
from jaxserve.engine.logits_processors import (
    MAX_BIAS_ENTRIES,
    LogitsExtras,
    build_logits_extras,
    needs_extras,
)
from jaxserve.engine.sampler import LogprobsOut, SamplingTensors, build_sampling_tensors, sample
from jaxserve.engine.scheduler import ScheduledRequest
from jaxserve.models.decoder import KVCache
from jaxserve.pallas_kernels.ragged_paged_attention.metadata import (
    AttentionMetadata,
    build_host_metadata,
)
from jaxserve.weights.loader import LoadedModel

logger = logging.getLogger(__name__)


def kv_block_bytes(loaded: LoadedModel, block_size: int) -> int:
    """Bytes one KV block takes across all layers (K and V)."""
    c = loaded.config
    return c.num_layers * 2 * block_size * c.num_kv_heads * c.head_dim * jnp.dtype(loaded.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class HostLogprobs:
    """One step's logprobs on the host, one row per scheduled request."""

    sampled: np.ndarray  # f32[n]
    top_ids: np.ndarray  # i32[n, MAX_LOGPROBS]
    top_vals: np.ndarray  # f32[n, MAX_LOGPROBS]


class ModelRunner:
    """Owns parameters, KV pages and the compiled step executables."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        buckets: BucketPolicy,
    ) -> None:
        self.loaded = loaded
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.table_width = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        self.buckets = buckets
        c = loaded.config
        page_shape = (num_blocks, block_size, c.num_kv_heads, c.head_dim)
        self.kv_caches: list[KVCache] = [
            (jnp.zeros(page_shape, loaded.dtype), jnp.zeros(page_shape, loaded.dtype)) for _ in range(c.num_layers)
        ]
        graphdef = loaded.graphdef

        def step(
            state: nnx.State,
            kv_caches: list[KVCache],
            tokens_T: jax.Array,
            positions_T: jax.Array,
            meta: AttentionMetadata,
            logits_indices_B: jax.Array,
            sampling: SamplingTensors,
            extras: LogitsExtras,
        ) -> tuple[jax.Array, LogprobsOut, list[KVCache]]:
            model = nnx.merge(graphdef, state)
            logits, kv_caches = model(tokens_T, positions_T, kv_caches, meta, logits_indices_B)
            tokens, logprobs = sample(logits, sampling, extras)
            return tokens, logprobs, kv_caches

        self._jitted = jax.jit(step, donate_argnums=(1,))
        self._compiled: dict[StepShape, jax.stages.Compiled] = {}

    # ----------------------------------------------------------------------------------------
    def _host_inputs(
        self, shape: StepShape, scheduled: list[ScheduledRequest], seeds: list[int]
    ) -> tuple:
        tokens = np.zeros(shape.num_tokens, np.int32)
        positions = np.zeros(shape.num_tokens, np.int32)
        logits_indices = np.zeros(shape.num_seqs, np.int32)
        t = 0
        for b, s in enumerate(scheduled):
            n = s.num_tokens
            tokens[t : t + n] = s.request.tokens(s.start, s.start + n)
            positions[t : t + n] = np.arange(s.start, s.start + n)
            logits_indices[b] = t + n - 1
            t += n
        meta = build_host_metadata(
            [s.num_tokens for s in scheduled],
            [s.start + s.num_tokens for s in scheduled],
            [s.request.block_ids for s in scheduled],
            self.block_size,
            num_tokens=shape.num_tokens,
            num_seqs=shape.num_seqs,
            table_width=self.table_width,
            num_rows=shape.num_rows,
            row_width=shape.row_width,
        ).as_metadata()
        sampling = build_sampling_tensors(
            [s.request.params for s in scheduled],
            seeds,
            [s.request.num_output_tokens for s in scheduled],
            shape.num_seqs,
        )
        extras = build_logits_extras(
            [s.request for s in scheduled], shape.num_seqs, with_extras=shape.extras, history_len=self.max_model_len
        )
        return tokens, positions, meta, logits_indices, sampling, extras

    def _abstract_inputs(self, shape: StepShape) -> tuple:
        i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
        f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
        b = shape.num_seqs
        meta = AttentionMetadata(
            slot_mapping=i32(shape.num_tokens),
            query_start_loc=i32(b + 1),
            seq_lens=i32(b),
            block_tables=i32(b, self.table_width),
            row_seq=i32(shape.num_rows),
            row_q_start=i32(shape.num_rows),
            row_q_len=i32(shape.num_rows),
            row_width=shape.row_width,
        )
        sampling = SamplingTensors(
            f32(b), f32(b), i32(b), f32(b), jax.ShapeDtypeStruct((b,), jnp.uint32), i32(b),
            jax.ShapeDtypeStruct((b,), jnp.bool_),
        )
        e = MAX_BIAS_ENTRIES if shape.extras else 0
        hl = self.max_model_len if shape.extras else 0
        extras = LogitsExtras(i32(b, e), f32(b, e), i32(b, hl), i32(b, hl), f32(b), f32(b), f32(b))
        return i32(shape.num_tokens), i32(shape.num_tokens), meta, i32(b), sampling, extras

    def compile_all(self, shapes: list[StepShape] | None = None) -> float:
        """Compile every bucket (or ``shapes``); returns the seconds it took."""
        t0 = time.perf_counter()
        for shape in shapes or self.buckets.all_shapes():
            if shape in self._compiled:
                continue
            ts = time.perf_counter()
            lowered = self._jitted.lower(self.loaded.state, self.kv_caches, *self._abstract_inputs(shape))
            self._compiled[shape] = lowered.compile()
            logger.debug("compiled %s in %.2fs", shape, time.perf_counter() - ts)
        return time.perf_counter() - t0

    @property
    def compiled_shapes(self) -> list[StepShape]:
        return sorted(self._compiled)

    def execute(
        self, scheduled: list[ScheduledRequest], seeds: list[int]
    ) -> tuple[np.ndarray, HostLogprobs | None]:
        """Run one step; returns the sampled token of every scheduled request (i32[len(scheduled)])
        and, when any of them asked, their logprobs.

        Entries of requests whose chunk does not reach the end of their sequence are meaningless.
        """
        num_tokens = sum(s.num_tokens for s in scheduled)
        extras = any(s.samples and needs_extras(s.request) for s in scheduled)
        shape = self.buckets.shape_for(len(scheduled), num_tokens, extras)
        compiled = self._compiled.get(shape)
        if compiled is None:
            raise RuntimeError(f"step shape {shape} was not compiled at start-up")
        inputs = self._host_inputs(shape, scheduled, seeds)
        next_tokens, logprobs, self.kv_caches = compiled(self.loaded.state, self.kv_caches, *inputs)
        n = len(scheduled)
        host_lp = None
        if any(s.request.params.logprobs is not None for s in scheduled):
            lp = jax.device_get(logprobs)
            host_lp = HostLogprobs(np.asarray(lp.sampled)[:n], np.asarray(lp.top_ids)[:n], np.asarray(lp.top_vals)[:n])
        return np.asarray(jax.device_get(next_tokens))[:n], host_lp
