"""The only engine part that touches the device: host batch -> padded arrays -> compiled step.

Every step shape is compiled ahead of time (``compile_all``) and executed through the compiled
executable itself, so serving can never trigger a compile: a batch that fits no compiled shape
raises instead. The KV-cache pages are donated to each step and updated in place.

``dispatch`` returns at once (jax dispatch is asynchronous); ``fetch`` waits for the sampled ids.
A token the host does not know yet (``PLACEHOLDER``, sampled by the previous, still running step)
is read on device from that step's output, so step N+1 can be dispatched before step N's tokens
reach the host. A step with a grammar row is two executables (``engine/step_functions.py``):
``dispatch`` runs its forward and leaves the logits on device; ``sample`` runs its sampling once
the engine has applied the previous step's tokens, so the mask comes from up-to-date matchers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.engine.compilation import BucketPolicy, StepShape
from jaxserve.engine.grammar import build_mask, mask_width
from jaxserve.engine.lora_slots import LoraSlots
from jaxserve.engine.logits_processors import (
    MAX_BIAS_ENTRIES,
    LogitsExtras,
    build_logits_extras,
    complete_pending_history,
    needs_extras,
)
from jaxserve.engine.sampler import LogprobsOut, SamplingTensors, build_sampling_tensors
from jaxserve.engine.scheduler import ScheduledRequest
from jaxserve.engine.step_executables import StepExecutables
from jaxserve.engine.step_functions import build_forward, build_sample, build_step, split_inputs
from jaxserve.models.attention import abstract_metadata, host_metadata_and_positions
from jaxserve.models.attention_backends import KVCache, SplitPagesBackend, TpuBackend, get_backend
from jaxserve.request import PLACEHOLDER, Request
from jaxserve.weights.loader import LoadedModel



def kv_block_bytes(loaded: LoadedModel, block_size: int, backend: str = "reference") -> int:
    """Bytes one KV block takes across all layers in ``backend``'s layout and page dtype."""
    c = loaded.config
    attention = get_backend(backend)
    dtype = attention.page_dtype(loaded.compute_dtype, loaded.dtype)
    shapes = attention.cache_shapes(1, block_size, c.num_kv_heads, c.head_dim, dtype)
    return c.num_layers * sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize for s in jax.tree.leaves(shapes))


@functools.lru_cache(maxsize=8)
def _zeros(sharding: jax.sharding.Sharding) -> Callable:
    """``jnp.zeros`` placed with ``sharding``: one jit per sharding, so all layers' caches of one
    shape share one executable (a jit per cache was 60 compiles for SmolLM2: seconds of start-up)."""
    return jax.jit(jnp.zeros, static_argnums=(0, 1), out_shardings=sharding)


@functools.lru_cache(maxsize=16)
def _no_mask(num_rows: int) -> np.ndarray:
    """The zero-width mask of a step whose mask, if any, ``sample`` makes (one read-only array per
    row count: the host inputs are built every step)."""
    mask = np.zeros((num_rows, 0), np.int32)
    mask.flags.writeable = False
    return mask


def _abstract(a: jax.Array | jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)


def _local(x: jax.Array) -> np.ndarray:
    """A replicated array's value from this process's first shard (works across hosts too)."""
    return np.asarray(x.addressable_shards[0].data)


@dataclasses.dataclass(frozen=True)
class HostLogprobs:
    """One step's logprobs on the host, one row per scheduled request."""

    sampled: np.ndarray  # f32[n]
    top_ids: np.ndarray  # i32[n, MAX_LOGPROBS]
    top_vals: np.ndarray  # f32[n, MAX_LOGPROBS]


@dataclasses.dataclass(frozen=True)
class PendingSample:
    """A grammar step whose forward was dispatched: its logits (on device) and its sampling inputs."""

    shape: StepShape
    logits: jax.Array  # [B, V] (device)
    grammar_rows: list[tuple[int, Request]]  # (row, request) for each sampling request with a grammar
    requests: list[Request]  # the request of each row (penalty histories are completed from them)
    sampling: SamplingTensors
    extras: LogitsExtras


@dataclasses.dataclass
class StepHandle:
    """A dispatched step: device outputs plus which row holds each request's sample.

    ``pending`` is set (and ``tokens`` None) for a grammar step whose sampling is not dispatched
    yet: ``ModelRunner.sample`` returns the handle with its tokens.
    """

    tokens: jax.Array | None  # i32[max_rows] (device) sampled ids, padded
    logprobs: LogprobsOut | None
    rows: dict[str, int]  # request id -> row, for requests whose chunk samples
    num_scheduled: int
    want_logprobs: bool
    dispatched_at: float
    pending: PendingSample | None = None


class ModelRunner(StepExecutables):
    """Owns parameters, KV pages and the step functions; runs the compiled executables
    (``engine/step_executables.py`` compiles, warms up and picks them)."""

    can_compile_in_background = True  # dispatch runs a step in a ready shape while others compile

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        buckets: BucketPolicy,
        backend: str,
        lora: LoraSlots | None = None,
    ) -> None:
        """``loaded`` may hold abstract parameters (``abstract_loaded_model``): then nothing is
        allocated and the runner can only ``lower`` its steps. ``lora``: the adapter slots every
        step then carries (with each token's slot)."""
        self.loaded = loaded
        self.lora = lora
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.table_width = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        self.buckets = buckets
        self.compile_cache_hits = 0
        self.vocab_size = loaded.config.vocab_size  # V: logits width, and the grammar mask's
        self.mask_seconds = 0.0  # host time spent filling grammar masks, and in how many steps
        self.mask_steps = 0
        self.abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(loaded.state))
        plan = loaded.plan
        kv_sh = self._allocate_caches(get_backend(backend), num_blocks)
        # The parameters travel as a flat list of arrays: flattening the NNX state (hundreds of
        # Variables) on every call costs host time on the serving path.
        self._params, state_def = jax.tree_util.tree_flatten(loaded.state)
        rep = plan.replicated
        self.max_rows = max(s.num_seqs for s in buckets.all_shapes())
        state_sh, kv_shs = [a.sharding for a in self._params], [kv_sh] * loaded.config.num_layers
        self.step_fn = self._jit_step(state_def, state_sh, kv_shs)
        self._jit_grammar_steps(state_def, state_sh, kv_shs)
        prev = jax.ShapeDtypeStruct((self.max_rows,), jnp.int32, sharding=rep)
        self._prev_tokens = prev if self.abstract else jax.device_put(jnp.zeros(prev.shape, jnp.int32), rep)
        self._init_executables()

    def _jit_step(self, state_def: jax.tree_util.PyTreeDef, state_sh: list, kv_shs: list) -> Callable:
        """The jitted step (traced per shape by ``lower``): host inputs replicated, parameters, LoRA
        slots and KV pages keeping their shardings, the caches donated."""
        rep = self.loaded.plan.replicated
        return jax.jit(
            build_step(self.loaded.graphdef, state_def, self.max_rows),
            donate_argnums=(1,),
            in_shardings=(state_sh, kv_shs, None if self.lora is None else self.lora.shardings(),
                          rep, rep, rep, rep, rep, rep, rep, rep, rep, rep),
            out_shardings=(rep, rep, kv_shs),
        )

    def _jit_grammar_steps(self, state_def: jax.tree_util.PyTreeDef, state_sh: list, kv_shs: list) -> None:
        """A grammar step's two jitted halves: the forward (caches donated, logits kept) and sampling."""
        rep = self.loaded.plan.replicated
        lora_sh = None if self.lora is None else self.lora.shardings()
        self.forward_fn = jax.jit(
            build_forward(self.loaded.graphdef, state_def),
            donate_argnums=(1,),
            in_shardings=(state_sh, kv_shs, lora_sh, *[rep] * 7),
            out_shardings=(rep, kv_shs),
        )
        self.sample_fn = jax.jit(build_sample(self.max_rows), in_shardings=(rep,) * 4, out_shardings=(rep, rep))

    def _allocate_caches(self, attention: SplitPagesBackend | TpuBackend, num_blocks: int) -> KVCache:
        """One zeroed cache per layer in the attention backend's layout; returns its shardings.

        The cache holds activations in the backend's page dtype: the model dtype on accelerators;
        on CPU bf16 (as uint16 bits) with bf16 weights when the C++ kernel serves (``CpuBackend``),
        else float32 (XLA:CPU would convert a whole bf16 cache to scatter into it). Each leaf is split
        over the tensor-parallel devices by KV heads. Abstract runners get shapes only.
        """
        c, mesh = self.loaded.config, self.loaded.plan.mesh
        shapes = attention.cache_shapes(num_blocks, self.block_size, c.num_kv_heads, c.head_dim,
                                        attention.page_dtype(self.loaded.compute_dtype, self.loaded.dtype))
        kv_sh = jax.tree.map(lambda spec: jax.sharding.NamedSharding(mesh, spec), attention.cache_specs("model"))

        def allocate(shape: jax.ShapeDtypeStruct, sharding: jax.sharding.Sharding) -> jax.Array | jax.ShapeDtypeStruct:
            if self.abstract:
                return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)
            return _zeros(sharding)(shape.shape, shape.dtype)

        self.kv_caches: list[KVCache] = [jax.tree.map(allocate, shapes, kv_sh) for _ in range(c.num_layers)]
        return kv_sh

    # ----------------------------------------------------------------------------------------
    def _host_inputs(
        self, shape: StepShape, scheduled: list[ScheduledRequest], seeds: list[int], prev_rows: dict[str, int]
    ) -> tuple:
        """The step's host arrays, padded to ``shape`` (the fused step's argument order)."""
        tokens, prev_idx = self._token_arrays(shape, scheduled, prev_rows)
        meta, positions = host_metadata_and_positions(
            [s.num_tokens for s in scheduled],
            [s.start + s.num_tokens for s in scheduled],
            [s.request.block_ids for s in scheduled],
            self.block_size,
            num_tokens=shape.num_tokens,
            num_seqs=shape.num_seqs,
            table_width=self.table_width,
            decode_only=shape.decode_only,
        )
        # Each sequence's last token (padding rows: the step's last token; their samples are unused).
        logits_indices = np.maximum(meta.query_start_loc[1:] - 1, 0)
        sampling = build_sampling_tensors(
            [s.request.params for s in scheduled],
            seeds,
            [s.request.num_output_tokens for s in scheduled],
            shape.num_seqs,
        )
        extras = build_logits_extras(
            [s.request for s in scheduled], shape.num_seqs, with_extras=shape.extras, history_len=self.max_model_len
        )
        return (tokens, prev_idx, positions, meta, logits_indices, sampling, extras, _no_mask(shape.num_seqs),
                self._lora_slots(shape, scheduled))

    @staticmethod
    def _token_arrays(
        shape: StepShape, scheduled: list[ScheduledRequest], prev_rows: dict[str, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (0 where in flight) and the previous step's output row of each in-flight token
        (-1: known on the host). Positions and logits rows come from the attention metadata."""
        flat: list[int] = []
        pending: list[tuple[int, int]] = []  # (token index, previous step's row) of in-flight tokens
        for s in scheduled:
            flat += s.request.tokens(s.start, s.start + s.num_tokens)
            if flat[-1] == PLACEHOLDER:  # only a sequence's last token can still be in flight
                pending.append((len(flat) - 1, prev_rows[s.request.request_id]))
                flat[-1] = 0
        tokens = np.zeros(shape.num_tokens, np.int32)
        tokens[: len(flat)] = flat
        prev_idx = np.full(shape.num_tokens, -1, np.int32)
        if pending:
            idx, rows = zip(*pending, strict=True)
            prev_idx[list(idx)] = rows
        return tokens, prev_idx

    def _lora_slots(self, shape: StepShape, scheduled: list[ScheduledRequest]) -> np.ndarray | None:
        """Each token's adapter slot (-1: the base model and padding); None without LoRA."""
        if self.lora is None:
            return None
        slots = np.full(shape.num_tokens, -1, np.int32)
        t = 0
        for s in scheduled:
            slots[t : t + s.num_tokens] = self.lora.slot(s.request.lora_id)
            t += s.num_tokens
        return slots

    def _grammar_mask(self, shape: StepShape, grammar_rows: list[tuple[int, Request]]) -> np.ndarray:
        """The packed mask of a grammar step: each grammar row's allowed tokens, all ones for the
        other rows (and for requests that finished while the forward ran: their token is dropped).

        Each grammar row's matcher must have consumed every earlier token of its request: only this
        step's own output may still be pending, else the mask would belong to an older position.
        """
        rows = []
        for b, req in grammar_rows:
            if not req.status.finished:
                self._check_consumed(req)
                rows.append((b, req.grammar))
        t0 = time.perf_counter()
        mask = build_mask(rows, shape.num_seqs, self.vocab_size)
        self.mask_seconds += time.perf_counter() - t0
        self.mask_steps += 1
        return mask

    @staticmethod
    def _check_consumed(req: Request) -> None:
        if req.num_pending != 1:
            raise RuntimeError(f"request {req.request_id}: grammar mask built before its matcher consumed "
                               f"its previous token ({req.num_pending} outputs pending)")

    def _abstract_inputs(self, shape: StepShape) -> tuple:
        i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
        f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
        b = shape.num_seqs
        meta = abstract_metadata(shape.num_tokens, b, self.table_width, shape.decode_only)
        sampling = SamplingTensors(
            f32(b), f32(b), i32(b), f32(b), jax.ShapeDtypeStruct((b,), jnp.uint32), i32(b),
            jax.ShapeDtypeStruct((b,), jnp.bool_),
        )
        e = MAX_BIAS_ENTRIES if shape.extras else 0
        hl = self.max_model_len if shape.extras else 0
        extras = LogitsExtras(i32(b, e), f32(b, e), i32(b, hl), i32(b, hl), f32(b), f32(b), f32(b), i32(b))
        t = shape.num_tokens
        mask = i32(b, mask_width(self.vocab_size) if shape.grammar else 0)
        lora_slots = None if self.lora is None else i32(t)
        return i32(t), i32(t), i32(t), meta, i32(b), sampling, extras, mask, lora_slots

    def programs(self, shape: StepShape) -> list[tuple[Callable, tuple]]:
        """The jitted functions a step of ``shape`` runs, in order, with their arguments as shapes
        with shardings (also for exporting to another platform): the fused step, or a grammar
        step's forward then its sampling."""
        if not shape.grammar:
            return [(self.step_fn, self.abstract_args(shape))]
        lora = None if self.lora is None else jax.tree.map(_abstract, self.lora.layers)
        state = (*self._abstract_state(), lora, _abstract(self._prev_tokens))
        forward_inputs, sample_inputs = split_inputs(self._abstract_inputs(shape))
        rep = self.loaded.plan.replicated
        logits = jax.ShapeDtypeStruct((shape.num_seqs, self.vocab_size), jnp.float32, sharding=rep)
        return [(self.forward_fn, (*state, *forward_inputs)), (self.sample_fn, (logits, *sample_inputs))]

    def lower(self, shape: StepShape) -> list[jax.stages.Lowered]:
        """The executables of ``shape`` (see ``programs``) lowered for this process's devices."""
        return [fn.lower(*args) for fn, args in self.programs(shape)]

    def abstract_args(self, shape: StepShape) -> tuple:
        """The fused step's arguments as shapes with shardings."""
        lora = None if self.lora is None else jax.tree.map(_abstract, self.lora.layers)
        return (*self._abstract_state(), lora, _abstract(self._prev_tokens), *self._abstract_inputs(shape))

    def _abstract_state(self) -> tuple:
        """Parameters and KV caches as shapes with shardings."""
        return jax.tree.map(_abstract, self._params), jax.tree.map(_abstract, self.kv_caches)

    def _zero_inputs(self, shape: StepShape) -> list[tuple]:
        """Host placeholders with the structure of each executable's inputs of ``shape`` (followers'
        broadcast buffers): one tuple, or a grammar step's forward inputs and sampling inputs."""
        zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), self._abstract_inputs(shape))
        return list(split_inputs(zeros)) if shape.grammar else [zeros]

    def _lora_layers(self) -> tuple | None:
        return None if self.lora is None else self.lora.layers

    def _run(self, shape: StepShape, inputs: tuple) -> tuple[jax.Array, LogprobsOut]:
        (step,) = self._compiled[shape]
        tokens, logprobs, self.kv_caches = step(
            self._params, self.kv_caches, self._lora_layers(), self._prev_tokens, *inputs
        )
        self._prev_tokens = tokens
        return tokens, logprobs

    def _forward(self, shape: StepShape, inputs: tuple) -> jax.Array:
        forward = self._compiled[shape][0]
        logits, self.kv_caches = forward(self._params, self.kv_caches, self._lora_layers(), self._prev_tokens, *inputs)
        return logits

    def _sample(self, shape: StepShape, logits: jax.Array, inputs: tuple) -> tuple[jax.Array, LogprobsOut]:
        tokens, logprobs = self._compiled[shape][1](logits, *inputs)
        self._prev_tokens = tokens
        return tokens, logprobs

    def _run_parts(self, shape: StepShape, parts: list[tuple]) -> None:
        """Run a step from its host inputs, fused or forward then sample (warm-up and followers)."""
        if shape.grammar:
            self._sample(shape, self._forward(shape, parts[0]), parts[1])
        else:
            self._run(shape, parts[0])

    def follow(self) -> int:
        """On processes other than 0: run the steps process 0 broadcasts until it stops; returns the count.
        A grammar step comes in two broadcasts: the forward's inputs, then (once process 0 has the
        mask) the sampling inputs."""
        steps = 0
        while (received := self.channel.follower_receive()) is not None:
            shape, inputs = received
            if shape.grammar:
                logits = self._forward(shape, inputs)
                self._sample(shape, logits, self.channel.follower_receive_part(shape, 1))
            else:
                self._run(shape, inputs)
            steps += 1
        return steps

    def close(self) -> None:
        """On process 0: release the followers."""
        self.channel.leader_stop()

    def dispatch(
        self, scheduled: list[ScheduledRequest], seeds: list[int], prev_rows: dict[str, int]
    ) -> StepHandle:
        """Start one step on the device and return without waiting for it.

        ``prev_rows`` maps the requests of the previous (possibly still running) step to the rows
        of its output, for tokens the host does not know yet. A step with a grammar row runs only
        its forward here: the handle is ``pending`` until ``sample``.
        """
        num_tokens = sum(s.num_tokens for s in scheduled)
        extras = any(s.samples and needs_extras(s.request) for s in scheduled)
        grammar = any(s.samples and s.request.grammar is not None for s in scheduled)
        shape = self._usable_shape(self.buckets.shape_for(len(scheduled), num_tokens, extras, grammar))
        if shape not in self._compiled:
            raise RuntimeError(f"step shape {shape} was not compiled at start-up")
        inputs = self._host_inputs(shape, scheduled, seeds, prev_rows)
        handle = StepHandle(
            tokens=None,
            logprobs=None,
            rows={s.request.request_id: b for b, s in enumerate(scheduled) if s.samples},
            num_scheduled=len(scheduled),
            want_logprobs=any(s.request.params.logprobs is not None for s in scheduled),
            dispatched_at=time.perf_counter(),
        )
        if shape.grammar:
            forward_inputs, (sampling, extras, _) = split_inputs(inputs)
            self.channel.leader_send(shape, forward_inputs)
            logits = self._forward(shape, forward_inputs)
            # Whether a chunk samples must be read now: launching the step appends its placeholder.
            rows = [(b, s.request) for b, s in enumerate(scheduled) if s.samples and s.request.grammar is not None]
            reqs = [s.request for s in scheduled]
            handle.pending = PendingSample(shape, logits, rows, reqs, sampling, extras)
            return handle
        self.channel.leader_send(shape, inputs)
        handle.tokens, handle.logprobs = self._run(shape, inputs)
        return handle

    def sample(self, handle: StepHandle) -> StepHandle:
        """Dispatch a grammar step's sampling; call it once every grammar row's matcher has consumed
        its request's earlier tokens (the engine applies the previous step first)."""
        p = handle.pending
        assert p is not None, "sample() takes a pending grammar step"
        inputs = (p.sampling, complete_pending_history(p.extras, p.requests), self._grammar_mask(p.shape, p.grammar_rows))
        self.channel.leader_send_part(inputs)
        tokens, logprobs = self._sample(p.shape, p.logits, inputs)
        return dataclasses.replace(handle, tokens=tokens, logprobs=logprobs, pending=None)

    def faulty_grammar_rows(self, handle: StepHandle) -> list[tuple[Request, Exception]]:
        """A pending grammar step's requests whose own mask row fails to build, with the error."""
        assert handle.pending is not None
        faulty = []
        for _, req in handle.pending.grammar_rows:
            try:
                if not req.status.finished:
                    build_mask([(0, req.grammar)], 1, self.vocab_size)
            except Exception as e:  # noqa: BLE001 - reported per request by the engine
                faulty.append((req, e))
        return faulty

    def faulty_rows(self, scheduled: list[ScheduledRequest]) -> list[tuple[Request, Exception]]:
        """The scheduled requests whose own host inputs fail to build, one row at a time, with the error."""
        faulty = []
        for s in scheduled:
            req = s.request
            try:
                build_sampling_tensors([req.params], [req.seed], [req.num_output_tokens], 1)
                build_logits_extras([req], 1, with_extras=s.samples and needs_extras(req),
                                    history_len=self.max_model_len)
                if s.samples and req.grammar is not None:
                    build_mask([(0, req.grammar)], 1, self.vocab_size)
            except Exception as e:  # noqa: BLE001 - reported per request by the engine
                faulty.append((req, e))
        return faulty

    def fetch(self, handle: StepHandle) -> tuple[np.ndarray, HostLogprobs | None]:
        """Wait for a dispatched step; its sampled ids (one per scheduled request) and logprobs."""
        assert handle.tokens is not None, "a grammar step must be sampled before it is fetched"
        n = handle.num_scheduled
        tokens = _local(handle.tokens)[:n]
        host_lp = None
        if handle.want_logprobs:
            lp = handle.logprobs
            host_lp = HostLogprobs(_local(lp.sampled)[:n], _local(lp.top_ids)[:n], _local(lp.top_vals)[:n])
        return tokens, host_lp
