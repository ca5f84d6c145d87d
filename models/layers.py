"""Building blocks shared by the model families: linear, RMSNorm, embedding, RoPE, gated MLP.

Parameters are created as ``nnx.Param``; models are normally built under ``nnx.eval_shape`` and
then filled from a checkpoint, so initial values never materialise.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.models.config import RopeScaling
from jaxserve.models.lora import LayerLora, add_lora
from jaxserve.models.products import gated_matmul_t, matmul_t, matmul_t_add


class Linear(nnx.Module):
    """y = x @ kernel.T (+ bias); kernel is [out, in], the checkpoints' own layout.

    The product runs in the kernel's dtype with float32 accumulation and is returned in x's dtype,
    so bfloat16 weights can serve a float32 residual stream (fast bf16 dot products on CPUs).
    [out, in] is also the faster layout for XLA:CPU's small-batch bf16 products (down projection
    and LM head about 20 % faster than [in, out]; docs/benchmarks.md). ``product`` names how the
    product runs (``models/products.py``: XLA's dot_general, or the CPU backend's C++ GEMM).
    """

    def __init__(
        self, d_in: int, d_out: int, *, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs, product: str = "xla"
    ) -> None:
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (d_out, d_in), dtype) * 0.02)
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None
        self.product = product

    def __call__(self, x: jax.Array) -> jax.Array:
        y = matmul_t(x, self.kernel[...], self.product)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)

    def add_to(self, r: jax.Array, x: jax.Array, lora: LayerLora | None = None, target: str = "") -> jax.Array:
        """``r + add_lora(self(x), x, lora, target)`` (a residual add). Without a bias or a LoRA delta
        and with r in x's dtype, the product accumulates into r (``matmul_t_add``: one GEMM call
        under ``cpu_gemm``; the same ops as the expression under ``xla``)."""
        if self.bias is not None or r.dtype != x.dtype or (lora is not None and target in lora.weights):
            return r + add_lora(self(x), x, lora, target)
        return matmul_t_add(x, self.kernel[...], r, self.product)


class RMSNorm(nnx.Module):
    """HF-exact RMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype) -> None:
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


class Embedding(nnx.Module):
    """Token embedding table [V, D]."""

    def __init__(self, vocab: int, dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (vocab, dim), dtype) * 0.02)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0)


class GatedMLP(nnx.Module):
    """down(silu(gate(x)) * up(x)); without LoRA or biases the first half is ``gated_matmul_t``
    (one call under the ``cpu_gemm`` product; the same down product input under every product)."""

    def __init__(
        self, dim: int, hidden: int, *, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs, product: str = "xla"
    ) -> None:
        self.gate_proj = Linear(dim, hidden, bias=bias, dtype=dtype, rngs=rngs, product=product)
        self.up_proj = Linear(dim, hidden, bias=bias, dtype=dtype, rngs=rngs, product=product)
        self.down_proj = Linear(hidden, dim, bias=bias, dtype=dtype, rngs=rngs, product=product)

    def __call__(self, x: jax.Array, lora: LayerLora | None = None) -> jax.Array:
        h = self._hidden(x, lora)
        return add_lora(self.down_proj(h), h, lora, "down_proj")

    def add_to(self, r: jax.Array, x: jax.Array, lora: LayerLora | None = None) -> jax.Array:
        """``r + self(x, lora)``, the down product accumulated into r (``Linear.add_to``)."""
        return self.down_proj.add_to(r, self._hidden(x, lora), lora, "down_proj")

    def _hidden(self, x: jax.Array, lora: LayerLora | None) -> jax.Array:
        """The down product's input ``silu(gate(x)) * up(x)``."""
        if lora is None and self.gate_proj.bias is None and self.up_proj.bias is None:
            return gated_matmul_t(x, self.gate_proj.kernel[...], self.up_proj.kernel[...], self.gate_proj.product)
        gate = add_lora(self.gate_proj(x), x, lora, "gate_proj")
        return jax.nn.silu(gate) * add_lora(self.up_proj(x), x, lora, "up_proj")


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """Inverse RoPE frequencies [H/2] (float32, as HF computes them), with llama3/linear scaling."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv = inv.astype(np.float32)
    if scaling.rope_type == "linear":
        return (inv / scaling.factor).astype(np.float32)
    if scaling.rope_type == "llama3":
        factor = scaling.factor
        old = scaling.original_max_position_embeddings
        low_wavelen = old / scaling.low_freq_factor
        high_wavelen = old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def apply_rope(x_TNH: jax.Array, positions_T: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half (GPT-NeoX layout) rotary embedding, computed in float32 like HF.

    HF's ``x * cos + cat(-x2, x1) * sin`` with each head viewed as its two halves [2, H/2]: the
    rotated copy is those halves swapped (a reverse, not a concatenate) times ``(-sin, sin)``, the
    same products and sums. XLA:CPU's fusions with the minor-axis concatenate were ~4x slower
    (docs/benchmarks.md, "RoPE without a concatenate").
    """
    t, n, h = x_TNH.shape
    freqs = positions_T.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, H/2]
    cos, sin = jnp.cos(freqs).astype(x_TNH.dtype), jnp.sin(freqs).astype(x_TNH.dtype)
    cos_T122 = jnp.stack([cos, cos], axis=1)[:, None]  # [T, 1, 2, H/2]
    sin_T122 = jnp.stack([-sin, sin], axis=1)[:, None]
    halves = x_TNH.reshape(t, n, 2, h // 2)
    return (halves * cos_T122 + jnp.flip(halves, axis=2) * sin_T122).reshape(t, n, h)
