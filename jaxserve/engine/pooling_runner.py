"""The model runner of a pooling engine (a decoder embedder on the paged KV cache).

Same parameters, KV pages, buckets, start-up compilation and warm-up as ``ModelRunner``; only the
step differs, and the switch is made when the step is traced: a pooling step runs the flat batch
through the decoder (KV written to the pages, prefix blocks read from them) and returns the pooled
vector — the final-norm hidden state at each sequence's last scheduled position, L2-normalised if
the pooling says so — instead of sampled ids. No LM head, no sampling, no token fed back from the
previous step, so generate engines compile exactly the executables they did before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.tree_util import PyTreeDef

from jaxserve.engine.compilation import BucketPolicy, StepShape
from jaxserve.engine.model_runner import ModelRunner, _local
from jaxserve.engine.scheduler import ScheduledRequest
from jaxserve.models.attention import AttentionMetadata, abstract_metadata, host_metadata_and_positions
from jaxserve.models.attention_backends import KVCache
from jaxserve.models.bert import PoolingConfig, pool
from jaxserve.weights.loader import LoadedModel

POOLED_MODES = ("lasttoken",)  # poolings that need only the last token's state (prefix caching keeps them exact)


def build_pooling_step(graphdef: nnx.GraphDef, state_def: PyTreeDef, pooling: PoolingConfig) -> Callable:
    """The device step of a pooling engine: forward over the flat batch; pooled vectors [B, D] f32."""
    if pooling.mode not in POOLED_MODES:
        raise ValueError(f"pooling {pooling.mode!r} needs every token's state; the paged engine pools only "
                         f"{', '.join(POOLED_MODES)}")

    def step(
        params: list[jax.Array],
        kv_caches: list[KVCache],
        tokens_T: jax.Array,
        positions_T: jax.Array,
        meta: AttentionMetadata,
        last_B: jax.Array,
    ) -> tuple[jax.Array, list[KVCache]]:
        model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(state_def, params))
        h_BD, kv_caches = model.final_hidden(tokens_T, positions_T, kv_caches, meta, last_B)
        ones_B1 = jnp.ones((h_BD.shape[0], 1), jnp.bool_)
        return pool(h_BD[:, None], ones_B1, pooling), kv_caches

    return step


@dataclasses.dataclass(frozen=True)
class PoolingHandle:
    """A dispatched pooling step: its vectors on device, one row per scheduled request."""

    vectors: jax.Array  # f32[B, D] (device), padded rows beyond num_scheduled
    num_scheduled: int


class PoolingRunner(ModelRunner):
    """``ModelRunner`` whose steps return pooled vectors (see the module docstring)."""

    can_compile_in_background = False  # its dispatch needs the step's own shape compiled

    def __init__(self, loaded: LoadedModel, *, pooling: PoolingConfig, num_blocks: int, block_size: int,
                 max_model_len: int, buckets: BucketPolicy, backend: str) -> None:
        if buckets.sampling:
            raise ValueError("a pooling runner compiles no sampling shapes: BucketPolicy(sampling=False)")
        self.pooling = pooling
        super().__init__(loaded, num_blocks=num_blocks, block_size=block_size, max_model_len=max_model_len,
                         buckets=buckets, backend=backend)

    def _jit_step(self, state_def: PyTreeDef, state_sh: list, kv_shs: list) -> Callable:
        rep = self.loaded.plan.replicated
        return jax.jit(
            build_pooling_step(self.loaded.graphdef, state_def, self.pooling),
            donate_argnums=(1,),
            in_shardings=(state_sh, kv_shs, rep, rep, rep, rep),
            out_shardings=(rep, kv_shs),
        )

    def _abstract_inputs(self, shape: StepShape) -> tuple:
        i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
        meta = abstract_metadata(shape.num_tokens, shape.num_seqs, self.table_width, shape.decode_only)
        return i32(shape.num_tokens), i32(shape.num_tokens), meta, i32(shape.num_seqs)

    def abstract_args(self, shape: StepShape) -> tuple:
        return (*self._abstract_state(), *self._abstract_inputs(shape))

    def _host_inputs(self, shape: StepShape, scheduled: list[ScheduledRequest]) -> tuple:
        tokens = np.zeros(shape.num_tokens, np.int32)
        flat = [t for s in scheduled for t in s.request.tokens(s.start, s.start + s.num_tokens)]
        tokens[: len(flat)] = flat
        meta, positions = host_metadata_and_positions(
            [s.num_tokens for s in scheduled], [s.start + s.num_tokens for s in scheduled],
            [s.request.block_ids for s in scheduled], self.block_size, num_tokens=shape.num_tokens,
            num_seqs=shape.num_seqs, table_width=self.table_width, decode_only=shape.decode_only,
        )
        return tokens, positions, meta, np.maximum(meta.query_start_loc[1:] - 1, 0)

    def _run(self, shape: StepShape, inputs: tuple) -> jax.Array:
        (step,) = self._compiled[shape]
        vectors, self.kv_caches = step(self._params, self.kv_caches, *inputs)
        return vectors

    def dispatch(self, scheduled: list[ScheduledRequest]) -> PoolingHandle:  # type: ignore[override]
        """Start one pooling step on the device and return without waiting for it."""
        shape = self.buckets.shape_for(len(scheduled), sum(s.num_tokens for s in scheduled))
        if shape not in self._compiled:
            raise RuntimeError(f"step shape {shape} was not compiled at start-up")
        inputs = self._host_inputs(shape, scheduled)
        self.channel.leader_send(shape, inputs)
        return PoolingHandle(self._run(shape, inputs), len(scheduled))

    def fetch(self, handle: PoolingHandle) -> np.ndarray:  # type: ignore[override]
        """Wait for a dispatched step; its vectors, one row per scheduled request (f32 [n, D])."""
        return _local(handle.vectors)[: handle.num_scheduled]

