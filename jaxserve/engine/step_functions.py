"""The functions a device step runs, before ``jax.jit``: forward, sample, and the two fused.

Steps without a grammar row run ``build_step`` (forward and sampling in one executable). A step
with a grammar row runs ``build_forward`` (its logits stay on device) and, once the host has the
row's mask, ``build_sample``: the mask needs the matcher to have consumed the previous step's
token, and splitting lets the forward of step N+1 run while that token travels to the host (vLLM
v1's ``execute_model`` / ``sample_tokens`` split, SGLang's overlap scheduler). ``build_step`` is
the two composed, so a fused step traces exactly the operations it traced before the split.
``split_inputs`` cuts a step's host inputs into the two halves' inputs; ``program_key`` says when
two shapes can share an executable.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.engine.logits_processors import LogitsExtras, fill_pending_history
from jaxserve.engine.sampler import LogprobsOut, SamplingTensors, sample
from jaxserve.models.attention import AttentionMetadata
from jaxserve.models.attention_backends import KVCache
from jaxserve.models.lora import LoraBatch, LoraWeights


def resolve_tokens(prev_tokens_M: jax.Array, tokens_T: jax.Array, prev_idx_T: jax.Array) -> jax.Array:
    """The step's input tokens: those sampled by the previous step that the host has not seen yet
    (``prev_idx_T >= 0``) come from its output."""
    return jnp.where(prev_idx_T >= 0, prev_tokens_M[jnp.maximum(prev_idx_T, 0)], tokens_T)


def build_forward(graphdef: nnx.GraphDef, state_def: jax.tree_util.PyTreeDef) -> Callable:
    """Model forward over the flat batch: logits at each sequence's last position and the updated KV caches.

    ``lora_layers`` (the adapter slots) and ``lora_slots_T`` (each token's slot) are None without
    LoRA: the forward is then traced without any LoRA code.
    """

    def forward(
        params: list[jax.Array],
        kv_caches: list[KVCache],
        lora_layers: tuple[dict[str, LoraWeights], ...] | None,
        prev_tokens_M: jax.Array,
        tokens_T: jax.Array,
        prev_idx_T: jax.Array,
        positions_T: jax.Array,
        meta: AttentionMetadata,
        logits_indices_B: jax.Array,
        lora_slots_T: jax.Array | None,
    ) -> tuple[jax.Array, list[KVCache]]:
        tokens_T = resolve_tokens(prev_tokens_M, tokens_T, prev_idx_T)
        model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(state_def, params))
        lora = None if lora_layers is None else LoraBatch(lora_layers, lora_slots_T)
        return model(tokens_T, positions_T, kv_caches, meta, logits_indices_B, lora)

    return forward


def build_sample(max_rows: int) -> Callable:
    """Sampling of a step's logits; the ids come back padded to ``max_rows`` (the next step reads them)."""

    def sample_step(
        logits_BV: jax.Array, sampling: SamplingTensors, extras: LogitsExtras, mask_BW: jax.Array
    ) -> tuple[jax.Array, LogprobsOut]:
        tokens, logprobs = sample(logits_BV, sampling, extras, mask_BW)
        return jnp.zeros((max_rows,), jnp.int32).at[: tokens.shape[0]].set(tokens), logprobs

    return sample_step


def build_step(graphdef: nnx.GraphDef, state_def: jax.tree_util.PyTreeDef, max_rows: int) -> Callable:
    """The fused device step: forward then sampling; the KV caches come back updated. A penalty
    row's in-flight output token is its chunk's last input token (read here on device)."""
    forward, sample_step = build_forward(graphdef, state_def), build_sample(max_rows)

    def step(
        params: list[jax.Array],
        kv_caches: list[KVCache],
        lora_layers: tuple[dict[str, LoraWeights], ...] | None,
        prev_tokens_M: jax.Array,
        tokens_T: jax.Array,
        prev_idx_T: jax.Array,
        positions_T: jax.Array,
        meta: AttentionMetadata,
        logits_indices_B: jax.Array,
        sampling: SamplingTensors,
        extras: LogitsExtras,
        mask_BW: jax.Array,
        lora_slots_T: jax.Array | None,
    ) -> tuple[jax.Array, LogprobsOut, list[KVCache]]:
        logits, kv_caches = forward(params, kv_caches, lora_layers, prev_tokens_M, tokens_T, prev_idx_T, positions_T,
                                    meta, logits_indices_B, lora_slots_T)
        extras = fill_pending_history(extras, resolve_tokens(prev_tokens_M, tokens_T, prev_idx_T)[logits_indices_B])
        padded, logprobs = sample_step(logits, sampling, extras, mask_BW)
        return padded, logprobs, kv_caches

    return step


def program_key(fn: Callable, args: tuple) -> tuple:
    """Identifies an executable: the jitted function, its arguments' structure (with static
    metadata such as ``decode_only``), shapes and dtypes."""
    leaves, treedef = jax.tree.flatten(args)
    return (id(fn), treedef, tuple((a.shape, str(a.dtype)) for a in leaves))


def split_inputs(inputs: tuple) -> tuple[tuple, tuple]:
    """A step's inputs (the fused step's order) as a grammar step's forward inputs and its sampling
    inputs (sampling settings, extras, mask)."""
    return (*inputs[:5], inputs[8]), inputs[5:8]
