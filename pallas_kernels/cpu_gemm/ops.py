"""The jax wrapper of the CPU GEMM kernel (an XLA FFI custom call, ``kernel.cc``)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxserve.pallas_kernels.cpu_gemm import build


def available() -> bool:
    """Build and register the kernel if needed; False (after one warning) when it cannot be built."""
    return build.load()


def native_bf16() -> bool:
    """Whether the kernel uses the CPU's bf16 dot products (AVX512-BF16); else its f32 path is slower than XLA's."""
    return build.native_bf16()


def cpu_gemm(x_MK: jax.Array, w_NK: jax.Array) -> jax.Array:
    """y[M, N] = x[M, K] . w[N, K]^T in float32, of bfloat16 x and w (products summed in float32).

    w is stored as given (a checkpoint's [out, in]); any leading dims of x are flattened and
    restored. Raises RuntimeError when the kernel is unavailable (check ``available()`` first).
    """
    return _call(build.TARGET, jnp.float32, x_MK, w_NK)


def cpu_gated_gemm(x_MK: jax.Array, wg_FK: jax.Array, wu_FK: jax.Array) -> jax.Array:
    """h[M, F] = silu(x . wg^T) * (x . wu^T) in bfloat16 (a gated MLP's first half in one call): the
    two products as ``cpu_gemm`` computes them, then XLA's ``(g * (1 / (1 + exp(-g)))) * u`` in
    float32 with a polynomial exp (~1 ulp), rounded to nearest even once. Same dtypes, layouts and
    errors as ``cpu_gemm``; wg and wu of one shape."""
    if wg_FK.shape != wu_FK.shape or wu_FK.dtype != jnp.bfloat16:
        raise ValueError(f"gate and up weights must be bfloat16 of one shape, got {wg_FK.shape} and {wu_FK.shape} "
                         f"{wu_FK.dtype}")
    return _call(build.GATED_TARGET, jnp.bfloat16, x_MK, wg_FK, wu_FK)


def cpu_gemm_add(x_MK: jax.Array, w_NK: jax.Array, r_MN: jax.Array) -> jax.Array:
    """y[M, N] = r[M, N] + x[M, K] . w[N, K]^T in float32: ``cpu_gemm``'s sums, each added to r's value
    by one float32 add (XLA's ``r + cpu_gemm(x, w)``, bit for bit). r (float32, x's leading dims and
    N) is aliased to y: the sums are added in place, after a copy XLA makes where r is used again."""
    n = w_NK.shape[0]
    if r_MN.dtype != jnp.float32 or r_MN.shape != (*x_MK.shape[:-1], n):
        raise ValueError(f"r must be float32 {(*x_MK.shape[:-1], n)}, got {r_MN.dtype} {r_MN.shape}")
    r2 = r_MN.reshape(math.prod(x_MK.shape[:-1]), n)
    return _call(build.ADD_TARGET, jnp.float32, x_MK, w_NK, r2, aliases={2: 0})


def _call(target: str, out: jnp.dtype, x_MK: jax.Array, w_NK: jax.Array, *more: jax.Array,
          aliases: dict[int, int] | None = None) -> jax.Array:
    """``target`` on x (leading dims flattened, then restored) and the weights, after the checks;
    ``aliases``: ``ffi_call``'s input_output_aliases (operand index -> output index)."""
    if not build.load():
        raise RuntimeError("the CPU GEMM kernel could not be built (see the warning logged)")
    if x_MK.dtype != jnp.bfloat16 or w_NK.dtype != jnp.bfloat16:
        raise ValueError(f"x and w must be bfloat16, got {x_MK.dtype} and {w_NK.dtype}")
    if w_NK.ndim != 2 or x_MK.shape[-1] != w_NK.shape[1]:
        raise ValueError(f"w must be [N, K={x_MK.shape[-1]}], got {w_NK.shape}")
    lead, k = x_MK.shape[:-1], x_MK.shape[-1]
    x2 = x_MK.reshape(math.prod(lead), k)
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x2.shape[0], w_NK.shape[0]), out),
                            input_output_aliases=aliases)
    return call(x2, w_NK, *more).reshape(*lead, w_NK.shape[0])
