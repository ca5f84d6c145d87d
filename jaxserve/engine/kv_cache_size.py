"""How many KV blocks fit: a memory budget on accelerators, a fixed GiB budget on CPU.

On accelerators each model's ``--gpu-memory-utilization`` is its share of the card (vLLM's meaning;
with several models in one process, as with several vLLM processes on one GPU, each gets its own
share): its weights, activations and KV cache fit in that share. ``serve.check_memory`` checks
that the shares fit in XLA's pool before any model loads.
"""

from __future__ import annotations

import dataclasses
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


def pool_fraction() -> float:
    """The share of the card XLA's pool holds (``XLA_PYTHON_CLIENT_MEM_FRACTION``, 0.75 when unset)."""
    return float(os.environ.get(XLA_POOL_ENV) or XLA_DEFAULT_POOL)


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """One accelerator's memory as this process sees it: XLA's pool and the share of the card it is."""

    bytes_limit: int
    pool_fraction: float

    @property
    def card_bytes(self) -> float:
        return self.bytes_limit / self.pool_fraction


def device_stats() -> dict:
    """The first local device's allocator statistics (``bytes_limit``, ``bytes_in_use``; {} on CPU)."""
    return jax.local_devices()[0].memory_stats() or {}


def device_memory(platform: str) -> DeviceMemory:
    limit = device_stats().get("bytes_limit")
    if limit is None:
        raise RuntimeError(f"cannot read the {platform} device's memory size; set --num-kv-blocks")
    return DeviceMemory(limit, pool_fraction())


def device_bytes_in_use(platform: str) -> int:
    """Bytes this process holds on its first device now (0 on CPU): what models loaded earlier took."""
    return 0 if platform == "cpu" else int(device_stats().get("bytes_in_use", 0))


def device_budget_bytes(config: ServeConfig, bytes_limit: int) -> int:
    """Bytes this process may use on one device: ``gpu_memory_utilization`` of the card, within XLA's pool.

    ``bytes_limit`` is the pool (its fraction of the card is ``XLA_PYTHON_CLIENT_MEM_FRACTION``,
    0.75 when unset), so the card's size is ``bytes_limit / fraction``.
    """
    return min(bytes_limit, int(config.gpu_memory_utilization * bytes_limit / pool_fraction()))


def activation_reserve_bytes(config: ServeConfig, loaded: LoadedModel) -> int:
    """A generous bound on one step's live activations (hidden states, MLP, logits, sampling)."""
    c = loaded.config
    itemsize = jnp.dtype(loaded.dtype).itemsize
    t, b = config.max_num_batched_tokens, config.max_num_seqs
    per_token = (4 * c.hidden_size + 3 * c.intermediate_size + 3 * c.num_heads * c.head_dim) * itemsize
    logits = 4 * b * c.vocab_size * 4
    return max(256 << 20, 2 * (t * per_token + logits))


def num_kv_blocks(
    config: ServeConfig, loaded: LoadedModel, max_model_len: int, platform: str, *, in_use_before: int = 0,
    backend: str = "reference",
) -> int:
    """Blocks to allocate (including the reserved null block); errors if one full sequence won't fit.

    On CPU the GiB budget is for the whole cache; on accelerators the budget is per device and the
    cache is split by KV heads over the tensor-parallel devices. ``in_use_before``: device bytes
    held before this model loaded (other models'); the model's share pays only for its own.
    ``backend``: the attention backend whose page layout and dtype the blocks take.
    """
    block_bytes = kv_block_bytes(loaded, config.block_size, backend)
    if config.num_kv_blocks is not None:
        blocks = config.num_kv_blocks
    elif platform == "cpu":
        blocks = int(config.kv_cache_memory_gib * GIB // block_bytes)
        logger.info(
            "on CPU the KV cache gets --kv-cache-memory-gib (%g GiB); --gpu-memory-utilization (%g) applies "
            "to accelerators only", config.kv_cache_memory_gib, config.gpu_memory_utilization,
        )
    else:
        limit = device_memory(platform).bytes_limit
        in_use = device_bytes_in_use(platform)
        own = in_use - in_use_before  # this model's weights so far
        # Its share pays for its own weights; the pool's free bytes bound it too.
        budget = min(device_budget_bytes(config, limit) - own, limit - in_use) - activation_reserve_bytes(config, loaded)
        blocks = max(budget, 0) * loaded.plan.tp // block_bytes  # each device holds 1/tp of every block
        logger.info(
            "device pool %.1f GiB, this model's share %.1f GiB (--gpu-memory-utilization %.2f), its weights %.1f GiB, "
            "other models' %.1f GiB, KV budget %.1f GiB", limit / GIB, device_budget_bytes(config, limit) / GIB,
            config.gpu_memory_utilization, own / GIB, in_use_before / GIB, max(budget, 0) / GIB,
        )
    needed = -(-max_model_len // config.block_size) + 1
    if blocks < needed:
        raise ValueError(
            f"the KV cache holds {max(blocks - 1, 0) * config.block_size} tokens, fewer than one "
            f"max_model_len ({max_model_len}) sequence: lower --max-model-len or give the cache more "
            "memory (--kv-cache-memory-gib on CPU, --gpu-memory-utilization, --num-kv-blocks)"
        )
    return blocks
