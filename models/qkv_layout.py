"""The fused q/k/v projection's output-feature layout: the one definition.

The model computes q, k and v with one ``[(N + 2K)·H, D]`` product. Its output features are laid
out shard-major for the ``tp`` tensor-parallel shards, ``[q_0 k_0 v_0 | q_1 k_1 v_1 | …]`` (``_s``:
the heads of shard ``s``), so splitting the features over the ``model`` mesh axis gives each
device whole heads of all three. When a checkpoint has fewer KV heads than shards, each of its
KV heads is repeated ``kv_replication`` times.

Users: ``models/decoder.py`` splits the product (``split``); the safetensors/GGUF loader reads
each fused row from the checkpoint's three tensors (``checkpoint_rows``); orbax checkpoints and
dummy weights hold the one-device ``[q | k | v]`` and are re-laid on device (``fused_rows``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

QKV_PARTS = ("q_proj", "k_proj", "v_proj")  # the checkpoint's three tensors, in fused order


@dataclasses.dataclass(frozen=True)
class QKVLayout:
    """Head counts of the fused projection as served; ``num_kv_heads`` already counts repeats."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    tp: int = 1
    kv_replication: int = 1

    @property
    def num_features(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def checkpoint_widths(self) -> tuple[int, int, int]:
        """Rows of the checkpoint's q, k and v tensors (KV heads not repeated)."""
        kv = self.num_kv_heads // self.kv_replication * self.head_dim
        return self.num_heads * self.head_dim, kv, kv

    def split(self, qkv_TF: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The fused product ``[T, F]`` (global features) -> ``q_TNH, k_TKH, v_TKH``."""
        t, h = qkv_TF.shape[0], self.head_dim
        nq, nk = self.num_heads // self.tp, self.num_kv_heads // self.tp  # heads per shard
        qkv = qkv_TF.reshape(t, self.tp, (nq + 2 * nk) * h)
        q = qkv[:, :, : nq * h].reshape(t, self.num_heads, h)
        k = qkv[:, :, nq * h : (nq + nk) * h].reshape(t, self.num_kv_heads, h)
        v = qkv[:, :, (nq + nk) * h :].reshape(t, self.num_kv_heads, h)
        return q, k, v

    @functools.cached_property
    def _sources(self) -> np.ndarray:
        """For each fused row: its row in the checkpoint's ``[q | k | v]`` concatenation."""
        h, r = self.head_dim, self.kv_replication
        nq, nk = self.num_heads // self.tp, self.num_kv_heads // self.tp
        q_rows, kv_rows, _ = self.checkpoint_widths
        rows = []
        for s in range(self.tp):
            rows.append(np.arange(s * nq * h, (s + 1) * nq * h))
            served = np.arange(s * nk * h, (s + 1) * nk * h)  # served KV rows of shard s
            ckpt = (served // h) // r * h + served % h  # served head j is checkpoint head j // r
            rows += [q_rows + ckpt, q_rows + kv_rows + ckpt]
        return np.concatenate(rows)

    def fused_rows(self) -> np.ndarray:
        """Gather indices: ``one_device[fused_rows()]`` is the served layout (orbax, dummy weights)."""
        return self._sources

    def checkpoint_rows(self, rows: slice) -> list[tuple[int, np.ndarray]]:
        """The fused rows ``rows`` as runs ``(part, rows of that part's tensor)``, in order.

        ``part`` indexes ``QKV_PARTS``; concatenating the runs' rows gives the fused slice.
        """
        src = self._sources[rows]
        starts = np.cumsum((0, *self.checkpoint_widths[:2]))
        part = np.searchsorted(starts, src, side="right") - 1
        cuts = np.flatnonzero(np.diff(part)) + 1
        return [(int(part[run[0]]), src[run] - starts[part[run[0]]])
                for run in np.split(np.arange(len(src)), cuts) if len(run)]
