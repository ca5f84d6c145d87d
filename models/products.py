"""Weight products ``y = x . W^T`` of ``Linear`` (W stored [out, in], the checkpoints' layout).

The product is chosen by name when a model is built (a static attribute of each ``Linear``; the
attention backend names it, ``models/attention_backends.py``):

- ``xla``: ``jax.lax.dot_general`` in W's dtype with float32 accumulation (every platform).
- ``cpu_gemm``: the C++ bf16 GEMM (``pallas_kernels/cpu_gemm``, an XLA FFI custom call) for
  products of at most ``GEMM_MAX_ROWS`` rows of x, where it beats XLA:CPU's (docs/benchmarks.md
  §15); larger products, non-bf16 weights, hosts without AVX512-BF16 and failed builds keep XLA's.
  A gated MLP's gate and up products and its SiLU gating are one call there (``gated_matmul_t``),
  and a product added to a float32 residual stream accumulates into it in the GEMM's store
  (``matmul_t_add``: no separate add).

Under a multi-device mesh the model asks for ``xla`` (tensor-parallel shardings stay XLA's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxserve.pallas_kernels.cpu_gemm import ops as cpu_gemm

PRODUCTS = ("xla", "cpu_gemm")
GEMM_MAX_ROWS = 64  # rows of x up to which the GEMM beats XLA:CPU (decode steps; prefill keeps XLA)


def for_mesh(product: str, mesh: Mesh | None) -> str:
    """The product a model built on ``mesh`` uses: ``product`` on one device, else ``xla``."""
    if product not in PRODUCTS:
        raise ValueError(f"unknown weight product {product!r}; known: {', '.join(PRODUCTS)}")
    return product if mesh is None or mesh.size == 1 else "xla"


def _use_gemm(x: jax.Array, w: jax.Array) -> bool:
    rows = x.size // max(x.shape[-1], 1)
    return (w.dtype == jnp.bfloat16 and w.ndim == 2 and 0 < rows <= GEMM_MAX_ROWS
            and cpu_gemm.available() and cpu_gemm.native_bf16())


def matmul_t(x: jax.Array, w: jax.Array, product: str = "xla") -> jax.Array:
    """float32 ``x[..., K] . w[N, K]^T`` with x cast to w's dtype (float32 accumulation)."""
    x = x.astype(w.dtype)
    if product == "cpu_gemm" and _use_gemm(x, w):
        return cpu_gemm.cpu_gemm(x, w)
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)


def gated_matmul_t(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, product: str = "xla") -> jax.Array:
    """``silu(x . w_gate^T) * (x . w_up^T)`` (bias-free ``Linear`` products, as ``matmul_t``'s) in x's
    dtype, rounded once to w's: the precision the MLP's down product reads it at (its input cast), so
    that XLA folds the round trip into that cast. ``cpu_gemm`` computes it in one call where the
    GEMM applies (the call returns it in w's dtype); otherwise these are ``GatedMLP``'s own ops."""
    if product == "cpu_gemm" and w_up.shape == w_gate.shape and w_up.dtype == w_gate.dtype and _use_gemm(x, w_gate):
        h = cpu_gemm.cpu_gated_gemm(x.astype(w_gate.dtype), w_gate, w_up)
    else:
        gate = matmul_t(x, w_gate, product).astype(x.dtype)
        h = jax.nn.silu(gate) * matmul_t(x, w_up, product).astype(x.dtype)
    return h.astype(w_gate.dtype).astype(x.dtype)


def matmul_t_add(x: jax.Array, w: jax.Array, r: jax.Array, product: str = "xla") -> jax.Array:
    """``r + matmul_t(x, w, product)`` in r's dtype (the product cast to it, then added). ``cpu_gemm``
    adds in the GEMM's store where it applies and r is float32 [..., N] (r's buffer reused in place:
    one call, no add op; the same float32 sums and add, so the same bits)."""
    if (product == "cpu_gemm" and r.dtype == jnp.float32 and r.shape == (*x.shape[:-1], w.shape[0])
            and _use_gemm(x, w)):
        return cpu_gemm.cpu_gemm_add(x.astype(w.dtype), w, r)
    return r + matmul_t(x, w, product).astype(r.dtype)
