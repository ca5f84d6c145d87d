"""LoRA adapters of one base model: their names, host copies and device slots (the one owner).

Adapters are registered by name (``--lora-modules``, or at runtime) and get an id that is never
reused (so a reloaded adapter never shares prefix-cache blocks with its predecessor). Before each
step the engine ``activate``s the adapters of the running requests: each gets one of ``max_loras``
device slots, evicting the least recently used adapter no running request needs (the scheduler
never runs more distinct adapters than slots). Host copies are kept for at most
``max_cpu_loras`` adapters (LRU); an evicted one is read from its directory again when needed.

Device layout (read by ``models/lora.py``): per layer and target, ``a_SRI`` ``[S, R, in]`` and
``b_OSR`` ``[out, S, R]`` with ``R = --max-lora-rank`` (``a_SRI`` of the fused q/k/v: 3R), rank
padded with zeros, sharded like the base kernel. Writing a slot replaces those arrays with new
ones of the same shape and sharding (a host-to-device copy): the compiled steps take them as
inputs, so loading or evicting an adapter never compiles anything.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections import OrderedDict
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxserve.models.config import ModelConfig
from jaxserve.models.lora import ROW_PARALLEL, TARGETS, LoraWeights
from jaxserve.models.qkv_layout import QKVLayout
from jaxserve.sharding import MODEL_AXIS, ShardingPlan
from jaxserve.weights.lora import LoraAdapter, LoraAdapterError, load_adapter

logger = logging.getLogger(__name__)

NO_SLOT = -1  # a token of the base model


class LoraNotFoundError(KeyError):
    """No adapter of that name is served (HTTP 404)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown LoRA adapter"


@dataclasses.dataclass(frozen=True)
class LoraRef:
    """A registered adapter: the name clients use, its never-reused id (> 0) and its directory."""

    name: str
    lora_id: int
    path: Path


def target_dims(config: ModelConfig, qkv_features: int, rank: int) -> dict[str, tuple[int, int, int, int]]:
    """target -> (rank rows of A, rank columns of B, in features, out features); ``qkv_features``:
    the fused q/k/v outputs (``QKVLayout.num_features``, KV heads repeated as served)."""
    c, r = config, rank
    nh = c.num_heads * c.head_dim
    return {"qkv_proj": (3 * r, r, c.hidden_size, qkv_features), "o_proj": (r, r, nh, c.hidden_size),
            "gate_proj": (r, r, c.hidden_size, c.intermediate_size), "up_proj": (r, r, c.hidden_size, c.intermediate_size),
            "down_proj": (r, r, c.intermediate_size, c.hidden_size)}


def adapter_params(config: ModelConfig, qkv_features: int, rank: int) -> int:
    """Parameters of one adapter of ``rank`` on every target of every layer (one slot's size)."""
    per_layer = sum(ra * i + rb * o for ra, rb, i, o in target_dims(config, qkv_features, rank).values())
    return per_layer * config.num_layers


def host_bytes(config: ModelConfig, *, max_loras: int, max_rank: int, max_cpu_loras: int, on_cpu: bool) -> int:
    """A bound on the host memory LoRA takes: the slots' host mirror, ``max_cpu_loras`` float32
    host copies of adapters (at most ``max_rank`` on every target) and, on CPU, the device slots
    themselves (float32 bound). ``serve.check_memory`` counts it beside the KV caches."""
    one = adapter_params(config, (config.num_heads + 2 * config.num_kv_heads) * config.head_dim, max_rank) * 4
    return (max(max_cpu_loras, max_loras) + max_loras * (2 if on_cpu else 1)) * one


class LoraSlots:
    """Registry, host LRU and device slots of the adapters served on one base model."""

    def __init__(
        self, config: ModelConfig, plan: ShardingPlan, *, max_loras: int, max_rank: int, max_cpu_loras: int,
        dtype: np.dtype,
    ) -> None:
        """``config`` is the model as served (KV heads already repeated for tensor parallelism)."""
        self.config, self.plan = config, plan
        self.num_slots, self.max_rank, self.max_cpu_loras = max_loras, max_rank, max(max_cpu_loras, max_loras)
        self.dtype = np.dtype(dtype)
        self.layout = QKVLayout(config.num_heads, config.num_kv_heads, config.head_dim, tp=plan.tp,
                                kv_replication=plan.kv_replication)
        self._dims = target_dims(config, self.layout.num_features, max_rank)
        self._refs: dict[str, LoraRef] = {}
        self._ids = itertools.count(1)
        self._host: OrderedDict[int, LoraAdapter] = OrderedDict()  # id -> adapter, LRU first
        self._slots: OrderedDict[int, int] = OrderedDict()  # id -> slot, LRU first
        self.loads = 0  # adapters written into a slot (a reload after eviction counts again)
        self._host_arrays = [{t: self._zeros(t) for t in TARGETS} for _ in range(config.num_layers)]
        self.layers: tuple[dict[str, LoraWeights], ...] = tuple(
            {t: self._put(t, a, b) for t, (a, b) in layer.items()} for layer in self._host_arrays)

    # ------------------------------------------------------------------ shapes and shardings
    def _specs(self, target: str) -> tuple[P, P]:
        if target in ROW_PARALLEL:
            return P(None, None, MODEL_AXIS), P(None, None, None)
        return P(None, None, None), P(MODEL_AXIS, None, None)

    def shardings(self) -> tuple[dict[str, LoraWeights], ...]:
        """The step's in_shardings for ``layers``."""
        mesh = self.plan.mesh
        one = {t: LoraWeights(*(NamedSharding(mesh, s) for s in self._specs(t))) for t in TARGETS}
        return tuple(dict(one) for _ in range(self.config.num_layers))

    def _zeros(self, target: str) -> tuple[np.ndarray, np.ndarray]:
        ra, rb, i, o = self._dims[target]
        return np.zeros((self.num_slots, ra, i), self.dtype), np.zeros((o, self.num_slots, rb), self.dtype)

    def _put(self, target: str, a: np.ndarray, b: np.ndarray) -> LoraWeights:
        sa, sb = (NamedSharding(self.plan.mesh, s) for s in self._specs(target))
        return LoraWeights(jax.device_put(a, sa), jax.device_put(b, sb))

    @property
    def nbytes(self) -> int:
        """Device bytes of all slots (every target of every layer); their host mirror is as large."""
        return self.num_slots * adapter_params(self.config, self.layout.num_features, self.max_rank) * self.dtype.itemsize

    # ------------------------------------------------------------------ registry
    def add(self, name: str, path: str | Path) -> LoraRef:
        """Register (and read, to validate) an adapter; ``LoraAdapterError`` / ``ValueError`` name the problem."""
        if name in self._refs:
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded")
        t0 = time.perf_counter()
        adapter = load_adapter(path, self.max_rank, self.config.num_layers)
        self._check_shapes(adapter)
        ref = LoraRef(name, next(self._ids), adapter.path)
        self._refs[name] = ref
        self._cache(ref.lora_id, adapter)
        logger.info("LoRA adapter %s (rank %d, %s) read in %.3fs", name, adapter.rank,
                    ", ".join(sorted(adapter.modules)), time.perf_counter() - t0)
        return ref

    def remove(self, name: str) -> LoraRef:
        """Forget an adapter (its slot is freed; the caller made sure no request uses it)."""
        ref = self._refs.pop(name)
        self._host.pop(ref.lora_id, None)
        self._slots.pop(ref.lora_id, None)
        return ref

    def get(self, name: str) -> LoraRef | None:
        return self._refs.get(name)

    @property
    def names(self) -> list[str]:
        return list(self._refs)

    @property
    def ids(self) -> set[int]:
        return {r.lora_id for r in self._refs.values()}

    def _check_shapes(self, adapter: LoraAdapter) -> None:
        c = self.config
        widths = dict(zip(("q_proj", "k_proj", "v_proj"), self.layout.checkpoint_widths, strict=True))
        dims = {"o_proj": (c.num_heads * c.head_dim, c.hidden_size), "gate_proj": (c.hidden_size, c.intermediate_size),
                "up_proj": (c.hidden_size, c.intermediate_size), "down_proj": (c.intermediate_size, c.hidden_size),
                **{m: (c.hidden_size, w) for m, w in widths.items()}}
        for (layer, module), (a, b) in adapter.weights.items():
            if (a.shape[1], b.shape[0]) != dims[module]:
                raise LoraAdapterError(
                    f"LoRA adapter {adapter.path}: layer {layer} {module}: lora_A {a.shape} / lora_B {b.shape} do not "
                    f"fit the base model (in {dims[module][0]}, out {dims[module][1]}): an adapter of another model?")

    def _cache(self, lora_id: int, adapter: LoraAdapter) -> None:
        self._host[lora_id] = adapter
        self._host.move_to_end(lora_id)
        while len(self._host) > self.max_cpu_loras:
            self._host.popitem(last=False)

    def _adapter(self, ref: LoraRef) -> LoraAdapter:
        adapter = self._host.get(ref.lora_id)
        if adapter is None:  # evicted from the host cache: read it again
            adapter = load_adapter(ref.path, self.max_rank, self.config.num_layers)
        self._cache(ref.lora_id, adapter)
        return adapter

    # ------------------------------------------------------------------ device slots
    def slot(self, lora_id: int) -> int:
        """The device slot of an active adapter; ``NO_SLOT`` for the base model (id 0)."""
        return NO_SLOT if lora_id == 0 else self._slots[lora_id]

    def activate(self, lora_ids: set[int]) -> None:
        """Give every adapter in ``lora_ids`` a slot (0 = base, ignored), evicting LRU adapters not in it."""
        needed = sorted(lora_ids - {0})
        if len(needed) > self.num_slots:
            raise RuntimeError(f"{len(needed)} adapters in one step but --max-loras is {self.num_slots}")
        by_id = {r.lora_id: r for r in self._refs.values()}
        for lora_id in needed:
            if lora_id in self._slots:
                self._slots.move_to_end(lora_id)
                continue
            used = set(self._slots.values())
            free = [s for s in range(self.num_slots) if s not in used]
            if not free:
                victim = next(i for i in self._slots if i not in lora_ids)
                free = [self._slots.pop(victim)]
            self._write(free[0], self._adapter(by_id[lora_id]))
            self._slots[lora_id] = free[0]

    def _write(self, slot: int, adapter: LoraAdapter) -> None:
        """Write ``adapter`` into ``slot`` of every target (zeros where it has no weights)."""
        for layer, arrays in enumerate(self._host_arrays):
            for target in TARGETS:
                a, b = arrays[target]
                a[slot], b[:, slot] = self._slot_matrices(adapter, layer, target)
            self.layers[layer].update({t: self._put(t, *arrays[t]) for t in TARGETS})
        self.loads += 1

    def _slot_matrices(self, adapter: LoraAdapter, layer: int, target: str) -> tuple[np.ndarray, np.ndarray]:
        """One slot's padded ``A [R, in]`` and ``B [out, R]`` of ``target``. For q/k/v: ``A [3R, in]``
        (``[A_q; A_k; A_v]``) and ``B`` in fused rows, each row its own part's B row."""
        rank_rows, rank_cols, d_in, d_out = self._dims[target]
        a = np.zeros((rank_rows, d_in), np.float32)
        if target != "qkv_proj":
            b = np.zeros((d_out, rank_cols), np.float32)
            if (layer, target) in adapter.weights:
                wa, wb = adapter.weights[(layer, target)]
                a[: wa.shape[0]], b[:, : wb.shape[1]] = wa, wb
            return a, b
        r = self.max_rank
        widths = self.layout.checkpoint_widths
        b_cat = np.zeros((sum(widths), r), np.float32)  # one-device [q | k | v] rows
        row = 0
        for part, (module, width) in enumerate(zip(("q_proj", "k_proj", "v_proj"), widths, strict=True)):
            if (layer, module) in adapter.weights:
                wa, wb = adapter.weights[(layer, module)]
                a[part * r : part * r + wa.shape[0]] = wa
                b_cat[row : row + width, : wb.shape[1]] = wb
            row += width
        return a, b_cat[self.layout.fused_rows()]
