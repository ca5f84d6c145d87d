"""How many KV blocks fit: a memory budget on accelerators, a fixed GiB budget on CPU."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp

from jaxserve.config import ServeConfig
from jaxserve.engine.model_runner import kv_block_bytes
from jaxserve.weights.loader import LoadedModel

logger = logging.getLogger(__name__)

GIB = 1 << 30
XLA_POOL_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
XLA_DEFAULT_POOL = 0.75  # jax's default share of an accelerator's memory for its allocator


def reserve_device_memory(fraction: float) -> None:
    """Size XLA's accelerator pool to ``fraction`` of the card (vLLM's ``--gpu-memory-utilization``).

    Must run before jax initialises a GPU backend; a value the user set in the environment wins.
    """
    os.environ.setdefault(XLA_POOL_ENV, str(fraction))


def device_budget_bytes(config: ServeConfig, bytes_limit: int) -> int:
    """Bytes this process may use on one device: ``gpu_memory_utilization`` of the card, within XLA's pool.

    ``bytes_limit`` is the pool (its fraction of the card is ``XLA_PYTHON_CLIENT_MEM_FRACTION``,
    0.75 when unset), so the card's size is ``bytes_limit / fraction``.
    """
    pool = float(os.environ.get(XLA_POOL_ENV) or XLA_DEFAULT_POOL)
    return min(bytes_limit, int(config.gpu_memory_utilization * bytes_limit / pool))


def activation_reserve_bytes(config: ServeConfig, loaded: LoadedModel) -> int:
    """A generous bound on one step's live activations (hidden states, MLP, logits, sampling)."""
    c = loaded.config
    itemsize = jnp.dtype(loaded.dtype).itemsize
    t, b = config.max_num_batched_tokens, config.max_num_seqs
    per_token = (4 * c.hidden_size + 3 * c.intermediate_size + 3 * c.num_heads * c.head_dim) * itemsize
    logits = 4 * b * c.vocab_size * 4
    return max(256 << 20, 2 * (t * per_token + logits))


def num_kv_blocks(config: ServeConfig, loaded: LoadedModel, max_model_len: int, platform: str) -> int:
    """Blocks to allocate (including the reserved null block); errors if one full sequence won't fit.

    On CPU the GiB budget is for the whole cache; on accelerators the budget is per device and the
    cache is split by KV heads over the tensor-parallel devices.
    """
    block_bytes = kv_block_bytes(loaded, config.block_size)
    if config.num_kv_blocks is not None:
        blocks = config.num_kv_blocks
    elif platform == "cpu":
        blocks = int(config.kv_cache_memory_gib * GIB // block_bytes)
        logger.info(
            "on CPU the KV cache gets --kv-cache-memory-gib (%g GiB); --gpu-memory-utilization (%g) applies "
            "to accelerators only", config.kv_cache_memory_gib, config.gpu_memory_utilization,
        )
    else:
        stats = jax.local_devices()[0].memory_stats() or {}
        limit = stats.get("bytes_limit")
        if limit is None:
            raise RuntimeError(f"cannot read the {platform} device's memory size; set --num-kv-blocks")
        in_use = stats.get("bytes_in_use", 0)
        budget = device_budget_bytes(config, limit) - in_use - activation_reserve_bytes(config, loaded)
        blocks = budget * loaded.plan.tp // block_bytes  # each device holds 1/tp of every block
        logger.info(
            "device pool %.1f GiB, allowed %.1f GiB (--gpu-memory-utilization %.2f), in use %.1f GiB, KV budget %.1f GiB",
            limit / GIB, device_budget_bytes(config, limit) / GIB, config.gpu_memory_utilization, in_use / GIB,
            max(budget, 0) / GIB,
        )
    needed = -(-max_model_len // config.block_size) + 1
    if blocks < needed:
        raise ValueError(
            f"the KV cache holds {max(blocks - 1, 0) * config.block_size} tokens, fewer than one "
            f"max_model_len ({max_model_len}) sequence: lower --max-model-len or give the cache more "
            "memory (--kv-cache-memory-gib on CPU, --gpu-memory-utilization, --num-kv-blocks)"
        )
    return blocks
