"""The CPU GEMM kernel (C++, XLA FFI) against a float32 product of the same bf16 inputs, its gated
product (a gated MLP's gate and up products and SiLU gating) against float64 and XLA's ops, its
accumulating product (r + x . w^T, r aliased) against float64 and XLA's add, the ``cpu`` backend's
weight products (``models/products.py``) in a model, and the fallback when it cannot be built."""

from __future__ import annotations

import logging
import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.models import products
from jaxserve.pallas_kernels.cpu_ffi_build import cache_dir
from jaxserve.pallas_kernels.cpu_gemm import build
from jaxserve.pallas_kernels.cpu_gemm.ops import cpu_gated_gemm, cpu_gemm, cpu_gemm_add
from tests.pallas_kernels.helpers import failing_kernel_build

# (M, N, K): K tails (100, 33, 1, 1537), N tails of every width below the 8- and 4-row tiles,
# M tails of 1-3 rows beside 4-row tiles, SmolLM2's shapes, a prefill-sized M.
SHAPES = [(1, 1, 1), (1, 7, 100), (3, 960, 576), (17, 7, 1536), (2, 13, 33), (64, 960, 576), (5, 1023, 1537),
          (256, 33, 100), (6, 576, 1536)]


def _inputs(m: int, n: int, k: int, seed: int) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((m, k), np.float32), jnp.bfloat16),
            jnp.asarray(rng.standard_normal((n, k), np.float32), jnp.bfloat16))


def _check(y, x, w) -> None:
    """y against float32 x . w^T; the bound scales with the sum of |products| (float32 rounding only)."""
    xf, wf = np.asarray(x, np.float32), np.asarray(w, np.float32)
    want, scale = xf @ wf.T, np.abs(xf) @ np.abs(wf).T
    assert y.shape == want.shape and y.dtype == np.float32
    assert np.all(np.abs(np.asarray(y) - want) <= 1e-5 * scale + 1e-6), np.max(np.abs(np.asarray(y) - want))


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemm_matches_the_float32_product(m, n, k):
    x, w = _inputs(m, n, k, seed=m * 7 + n + k)
    _check(jax.jit(cpu_gemm)(x, w), x, w)


def test_nan_rows_stay_in_their_output_rows_and_columns():
    """A NaN in x row 5 and w row 6 poisons only output row 5 and column 6 (no tile reads a neighbour)."""
    x, w = _inputs(9, 21, 70, seed=1)
    x, w = x.at[5, 69].set(jnp.nan), w.at[6, 0].set(jnp.nan)
    y = np.asarray(jax.jit(cpu_gemm)(x, w))
    bad = np.isnan(y)
    assert bad[5].all() and bad[:, 6].all() and bad.sum() == 21 + 9 - 1
    keep = np.ones_like(bad)
    keep[5], keep[:, 6] = False, False
    xf, wf = np.asarray(x, np.float32), np.asarray(w, np.float32)
    np.testing.assert_allclose(y[keep], np.nan_to_num(xf @ wf.T)[keep], rtol=1e-4, atol=1e-4)


def test_leading_dims_and_concurrent_callers():
    """x [B, L, K] (flattened and restored), four Python threads calling at once (each call also
    shares its blocks with XLA's pool threads)."""
    x, w = _inputs(2 * 24, 1536, 576, seed=3)
    f = jax.jit(cpu_gemm)
    want = np.asarray(f(x, w)).reshape(2, 24, 1536)
    got: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: got.append(np.asarray(f(x.reshape(2, 24, 576), w)))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(np.array_equal(g, want) for g in got)


# (M, F, K) of the gated product: M tails beside 4-row tiles and decode's 1-2 rows, F tails below a
# vector (16) and a block, K tails, SmolLM2's MLP.
GATED_SHAPES = [(1, 1536, 576), (2, 37, 100), (7, 1023, 33), (64, 1536, 576), (5, 3, 1537)]


def _silu_times(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    return g / (1 + np.exp(-g)) * u


@pytest.mark.parametrize("m,f,k", GATED_SHAPES)
def test_gated_product_matches_float64_and_xla_ops(m, f, k):
    """bf16 h against float64 silu(g) * u (bound: one bf16 rounding plus the float32 sums' error,
    carried through silu' <= 1.1 and |silu(g)| <= |g|), and against XLA's SiLU gating of the GEMM's
    two products rounded to bf16 (the unfused path: equal up to one bf16 ulp where XLA's exp and the
    kernel's differ by an ulp before rounding)."""
    x, wg = _inputs(m, f, k, seed=m + f + k)
    _, wu = _inputs(m, f, k, seed=m + f + k + 1)
    h = jax.jit(cpu_gated_gemm)(x, wg, wu)
    assert h.shape == (m, f) and h.dtype == jnp.bfloat16
    h = np.asarray(h, np.float64)
    xf, gf, uf = (np.asarray(a, np.float64) for a in (x, wg, wu))
    g, u = xf @ gf.T, xf @ uf.T
    want = _silu_times(g, u)
    err = 1e-5 * (np.abs(xf) @ np.abs(gf).T * 1.1 * np.abs(u) + np.abs(xf) @ np.abs(uf).T * np.abs(g)) + 1e-30
    assert np.all(np.abs(h - want) <= 2.0 ** -8 * np.abs(want) + err), np.max(np.abs(h - want) / (np.abs(want) + err))
    xla = jax.jit(lambda a, b, c: (jax.nn.silu(cpu_gemm(a, b)) * cpu_gemm(a, c)).astype(jnp.bfloat16))(x, wg, wu)
    np.testing.assert_allclose(h, np.asarray(xla, np.float64), rtol=2.0 ** -7, atol=1e-30)


def test_gated_product_overflow_nan_and_errors():
    """silu over the whole float range as XLA computes it in float32 (exp(-g) overflowing to inf gives
    -0, inf * 1 = inf, NaN stays NaN: assert_allclose matches NaNs), leading dims of x, and
    mismatched weights refused."""
    g = np.array([-200, -100, -89, -88.5, -88, -87.5, -87, -50, -1e-3, 0, 1e-3, 3, 50, 88.5, 200, np.inf, -np.inf,
                  np.nan], np.float32)
    wg = jnp.asarray(g[:, None], jnp.bfloat16)
    h = jax.jit(cpu_gated_gemm)(jnp.ones((1, 1, 1), jnp.bfloat16), wg, jnp.ones_like(wg))
    assert h.shape == (1, 1, len(g))
    want = jax.nn.silu(wg[:, 0].astype(jnp.float32)).astype(jnp.bfloat16)
    # (atol: where exp(-g) nears float32's limit, denormal quotients flush to zero, or not, by platform)
    got, want = np.asarray(h[0, 0], np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=2.0 ** -8, atol=1e-30)
    with pytest.raises(ValueError, match="one shape"):
        cpu_gated_gemm(jnp.ones((1, 4), jnp.bfloat16), jnp.ones((3, 4), jnp.bfloat16), jnp.ones((2, 4), jnp.bfloat16))


# (M, N, K) of the accumulating product: 1..64 rows (4-row tiles and their 1-3 row tails, decode's
# 1-2 rows with 8-column tiles), N tails below both tile widths and a vector, K tails, SmolLM2's o/down.
ADD_SHAPES = [(1, 13, 100), (2, 37, 33), (3, 576, 576), (5, 1023, 1537), (16, 7, 64), (17, 577, 1536),
              (64, 576, 1536), (64, 21, 96)]


@pytest.mark.parametrize("m,n,k", ADD_SHAPES)
def test_gemm_add_matches_float64_and_xlas_add_bit_for_bit(m, n, k):
    """r + x . w^T against float64 (float32 rounding of the sums and the add), and bit-identical to
    XLA's add of the plain GEMM's product (the same sums, one float32 add)."""
    x, w = _inputs(m, n, k, seed=m * 3 + n + k)
    r = jnp.asarray(np.random.default_rng(m + n).standard_normal((m, n), np.float32) * 4)
    y = jax.jit(cpu_gemm_add)(x, w, r)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    xf, wf, rf = np.asarray(x, np.float64), np.asarray(w, np.float64), np.asarray(r, np.float64)
    want, scale = rf + xf @ wf.T, np.abs(rf) + np.abs(xf) @ np.abs(wf).T
    assert np.all(np.abs(np.asarray(y, np.float64) - want) <= 1e-5 * scale + 1e-6)
    np.testing.assert_array_equal(y, jax.jit(lambda a, b, c: c + cpu_gemm(a, b))(x, w, r))


def test_gemm_add_keeps_r_for_later_uses_and_leading_dims():
    """r aliased to the output: where the caller reads r again (a jit argument, an intermediate used
    twice) XLA copies it first, so r's later uses see its old value; x [B, L, K] with r [B, L, N];
    an empty product adds +0 (XLA's -0 + 0); r of another shape or dtype is refused."""
    x, w = _inputs(12, 40, 64, seed=8)
    r = jnp.asarray(np.random.default_rng(8).standard_normal((12, 40), np.float32))
    want = np.asarray(jax.jit(lambda a, b, c: c + cpu_gemm(a, b))(x, w, r))
    r_host = np.asarray(r).copy()
    f = jax.jit(lambda a, b, c: (cpu_gemm_add(a, b, c), c * 2))
    y, twice = f(x, w, r)
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(twice, r_host * 2)
    np.testing.assert_array_equal(r, r_host)  # the argument itself is untouched
    assert "copy(" in f.lower(x, w, r).compile().as_text()

    def twice_used(a, b, c):
        s = c + 1.0  # an intermediate: the call may reuse its buffer only after the later reader's copy
        return cpu_gemm_add(a, b, s), s - 1.0
    y, back = jax.jit(twice_used)(x, w, r)
    np.testing.assert_array_equal(y, np.asarray(jax.jit(lambda a, b, c: (c + 1.0) + cpu_gemm(a, b))(x, w, r)))
    np.testing.assert_array_equal(back, np.asarray(jax.jit(lambda c: (c + 1.0) - 1.0)(r)))
    y3 = jax.jit(cpu_gemm_add)(x.reshape(3, 4, 64), w, r.reshape(3, 4, 40))
    np.testing.assert_array_equal(y3, want.reshape(3, 4, 40))
    neg0 = jnp.full((2, 3), -0.0, jnp.float32)
    z = np.asarray(jax.jit(cpu_gemm_add)(jnp.zeros((2, 0), jnp.bfloat16), jnp.zeros((3, 0), jnp.bfloat16), neg0))
    assert np.all(z == 0) and not np.any(np.signbit(z))
    with pytest.raises(ValueError, match="r must be float32"):
        cpu_gemm_add(x, w, r.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="r must be float32"):
        cpu_gemm_add(x, w, r[:, :39])


def _hlo(f, *args) -> str:
    return jax.jit(f).lower(*args).as_text()


def _calls(hlo: str, target: str) -> int:
    """Custom calls of ``target`` in lowered StableHLO text."""
    return hlo.count(f"stablehlo.custom_call @{target}(")


def test_gated_matmul_t_fuses_only_where_the_gemm_applies():
    """``gated_matmul_t``: one gated call (no plain GEMM calls) for small bf16 products under
    ``cpu_gemm``, XLA's ops for ``xla``, prefill-sized x and float32 weights; in x's dtype with w's
    precision, equal to the unfused ops' result rounded to bf16 (up to an ulp of exp, as above)."""
    x, wg = _inputs(products.GEMM_MAX_ROWS, 200, 96, seed=6)
    _, wu = _inputs(products.GEMM_MAX_ROWS, 200, 96, seed=7)
    x = x.astype(jnp.float32)
    fused = lambda a, b, c: products.gated_matmul_t(a, b, c, "cpu_gemm")  # noqa: E731
    hlo = _hlo(fused, x, wg, wu)
    assert _calls(hlo, build.GATED_TARGET) == 1 and _calls(hlo, build.TARGET) == 0
    assert _calls(_hlo(lambda a, b, c: products.gated_matmul_t(a, b, c, "xla"), x, wg, wu), build.GATED_TARGET) == 0
    big = jnp.zeros((products.GEMM_MAX_ROWS + 1, 96), jnp.float32)
    assert _calls(_hlo(fused, big, wg, wu), build.GATED_TARGET) == 0
    f32 = wg.astype(jnp.float32)
    assert "custom_call" not in _hlo(fused, x, f32, f32)
    h = jax.jit(fused)(x, wg, wu)
    assert h.dtype == jnp.float32 and np.array_equal(np.asarray(h), np.asarray(h.astype(jnp.bfloat16), np.float32))
    gate = products.matmul_t(x, wg)
    want = (jax.nn.silu(gate) * products.matmul_t(x, wu)).astype(jnp.bfloat16).astype(jnp.float32)
    np.testing.assert_allclose(h, want, rtol=2.0 ** -7, atol=1e-30)
    np.testing.assert_array_equal(jax.jit(lambda a, b, c: products.gated_matmul_t(a, b, c, "xla"))(x, wg, wu), want)


def test_products_use_the_gemm_for_small_bf16_products_only():
    x, w = _inputs(products.GEMM_MAX_ROWS, 64, 32, seed=4)
    assert build.TARGET in _hlo(lambda a, b: products.matmul_t(a, b, "cpu_gemm"), x.astype(jnp.float32), w)
    assert build.TARGET not in _hlo(lambda a, b: products.matmul_t(a, b, "xla"), x, w)
    big = jnp.zeros((products.GEMM_MAX_ROWS + 1, 32), jnp.bfloat16)
    assert build.TARGET not in _hlo(lambda a, b: products.matmul_t(a, b, "cpu_gemm"), big, w)  # prefill: XLA's
    assert build.TARGET not in _hlo(lambda a, b: products.matmul_t(a, b, "cpu_gemm"), x, w.astype(jnp.float32))
    with pytest.raises(ValueError, match="unknown weight product"):
        products.for_mesh("gemm", None)
    mesh = jax.make_mesh((2,), ("model",), devices=jax.devices()[:2])
    assert products.for_mesh("cpu_gemm", mesh) == "xla" and products.for_mesh("cpu_gemm", None) == "cpu_gemm"


def test_matmul_t_add_accumulates_only_where_the_gemm_applies():
    """``matmul_t_add``: one accumulating call (no plain GEMM call, no add) for small bf16 products
    into a float32 r of the product's shape under ``cpu_gemm``, bit-identical to XLA's add of the
    GEMM's product; otherwise ``r + matmul_t`` (the ``xla`` product: exactly that expression's HLO)."""
    x, w = _inputs(products.GEMM_MAX_ROWS, 70, 48, seed=9)
    x = x.astype(jnp.float32)
    r = jnp.asarray(np.random.default_rng(9).standard_normal((products.GEMM_MAX_ROWS, 70), np.float32))
    fused = lambda a, b, c: products.matmul_t_add(a, b, c, "cpu_gemm")  # noqa: E731
    hlo = _hlo(fused, x, w, r)
    assert _calls(hlo, build.ADD_TARGET) == 1 and _calls(hlo, build.TARGET) == 0 and "stablehlo.add" not in hlo
    np.testing.assert_array_equal(jax.jit(fused)(x, w, r),
                                  jax.jit(lambda a, b, c: c + products.matmul_t(a, b, "cpu_gemm"))(x, w, r))
    unfused = lambda a, b, c: c + products.matmul_t(a, b, "xla").astype(c.dtype)  # noqa: E731
    strip = lambda t: re.sub(r"loc\(.*?\)|#loc.*", "", t)  # noqa: E731  (source locations differ)
    assert strip(_hlo(lambda a, b, c: products.matmul_t_add(a, b, c, "xla"), x, w, r)) == strip(_hlo(unfused, x, w, r))
    big = jnp.zeros((products.GEMM_MAX_ROWS + 1, 48), jnp.float32)
    assert _calls(_hlo(fused, big, w, jnp.zeros((products.GEMM_MAX_ROWS + 1, 70))), build.ADD_TARGET) == 0
    for other in (r.astype(jnp.bfloat16), r[:1]):  # a bf16 residual stream, a broadcast r: XLA's add
        hlo = _hlo(fused, x, w, other)
        assert _calls(hlo, build.ADD_TARGET) == 0 and _calls(hlo, build.TARGET) == 1


def test_linear_and_mlp_add_to_keep_biases_and_lora_deltas():
    """``Linear.add_to`` / ``GatedMLP.add_to`` under ``cpu_gemm``: without a bias or the target's LoRA
    delta, one accumulating call equal to ``r + self(x)`` bit for bit; with a bias, or a LoRA delta of
    that target (an adapter on another target does not count), today's ``r + add_lora(self(x), ...)``."""
    from flax import nnx

    from jaxserve.models.layers import GatedMLP, Linear
    from jaxserve.models.lora import LayerLora, LoraWeights, add_lora

    rng = np.random.default_rng(10)
    x = jnp.asarray(rng.standard_normal((6, 48), np.float32))
    r = jnp.asarray(rng.standard_normal((6, 40), np.float32))
    delta = LoraWeights(jnp.asarray(rng.standard_normal((2, 4, 48)), jnp.bfloat16),
                        jnp.asarray(rng.standard_normal((40, 2, 4)), jnp.bfloat16))
    lora = LayerLora({"o_proj": delta}, jnp.asarray([0, -1, 1, 0, -1, 1], jnp.int32))
    for bias in (False, True):
        lin = Linear(48, 40, bias=bias, dtype=jnp.bfloat16, rngs=nnx.Rngs(bias), product="cpu_gemm")
        if bias:
            lin.bias[...] = jnp.asarray(rng.standard_normal(40), jnp.bfloat16)
        for lo, target in ((None, ""), (lora, "down_proj"), (lora, "o_proj")):
            f = lambda a, c, lo=lo, target=target: lin.add_to(c, a, lo, target)  # noqa: B023, E731
            fused = not bias and target != "o_proj"
            assert _calls(_hlo(f, x, r), build.ADD_TARGET) == int(fused), (bias, target)
            want = jax.jit(lambda a, c, lo=lo, target=target: c + add_lora(lin(a), a, lo, target))(x, r)  # noqa: B023
            np.testing.assert_array_equal(jax.jit(f)(x, r), want)
    mlp = GatedMLP(40, 64, bias=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(3), product="cpu_gemm")
    h = jnp.asarray(rng.standard_normal((6, 40), np.float32))
    down = LayerLora({"down_proj": LoraWeights(jnp.zeros((2, 4, 64), jnp.bfloat16), delta.b_OSR)}, lora.slots_T)
    for lo, calls in ((None, 1), (down, 0)):
        f = lambda a, c, lo=lo: mlp.add_to(c, a, lo)  # noqa: E731
        assert _calls(_hlo(f, h, r), build.ADD_TARGET) == calls
        np.testing.assert_array_equal(jax.jit(f)(h, r), jax.jit(lambda a, c, lo=lo: c + mlp(a, lo))(h, r))


@pytest.fixture
def failing_build(tmp_path, monkeypatch):
    yield from failing_kernel_build(build, tmp_path, monkeypatch)


def test_failed_build_falls_back_to_xla(failing_build, caplog):
    x, w = _inputs(4, 40, 64, seed=5)
    f = lambda a, b: products.matmul_t(a, b, "cpu_gemm")  # noqa: E731
    gated = lambda a, b: products.gated_matmul_t(a, b, b, "cpu_gemm")  # noqa: E731
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        hlo = _hlo(f, x, w)
        got = jax.jit(f)(x, w)
        assert "custom_call" not in _hlo(gated, x, w)
        assert build.load() is False  # tried once: no second build, no second warning
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "using XLA's dot products instead" in warnings[0].getMessage()
    assert build.TARGET not in hlo and "custom_call" not in hlo
    np.testing.assert_array_equal(got, jax.jit(lambda a, b: products.matmul_t(a, b, "xla"))(x, w))
    assert not list(cache_dir().glob("*.so*"))  # no half-written library left behind



def _tiny_decoder(backend: str):
    """A tiny random Qwen2-like decoder (q/k/v biases) with bf16 weights and f32 activations."""
    from flax import nnx

    from jaxserve.models.config import ModelConfig
    from jaxserve.models.decoder import DecoderForCausalLM

    cfg = ModelConfig("Qwen2ForCausalLM", vocab_size=301, hidden_size=96, intermediate_size=200, num_layers=2,
                      num_heads=6, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e4,
                      max_position_embeddings=64, qkv_bias=True)
    return DecoderForCausalLM(cfg, dtype=jnp.bfloat16, compute_dtype=jnp.float32, backend=backend, rngs=nnx.Rngs(0))


def _decode_step_hlo(model, rows: int) -> str:
    """Compiled HLO text of the model's decode step (``__call__``) over ``rows`` sequences."""
    from flax import nnx

    from jaxserve.models.attention import abstract_metadata
    from jaxserve.models.attention_backends import get_backend

    graphdef, state = nnx.split(model)
    cfg, attention = model.config, get_backend(model.layers[0].self_attn.backend)
    pages = attention.page_dtype(jnp.float32, jnp.bfloat16)
    cache = attention.cache_shapes(8, 16, cfg.num_kv_heads, cfg.head_dim, pages)
    i32 = jax.ShapeDtypeStruct((rows,), jnp.int32)
    step = lambda st, caches, t, p, m, i: nnx.merge(graphdef, st)(t, p, caches, m, i)  # noqa: E731
    meta = abstract_metadata(rows, rows, 4, True)
    return jax.jit(step).lower(state, [cache] * cfg.num_layers, i32, i32, meta, i32).compile().as_text()


def _residual_adds(hlo: str, rows: int, dim: int) -> int:
    """Elementwise f32 [rows, dim] adds in compiled HLO (the residual stream's; in the tiny decoder no
    other add has that shape)."""
    return len(re.findall(rf"= f32\[{rows},{dim}\]\{{1,0\}} add\(", hlo))


def test_decode_step_accumulates_residual_adds_in_the_gemm(monkeypatch):
    """The decode step under ``cpu``: o and down products are accumulating calls (2 per layer) and no
    [T, D] add is left; its twin, the residual adds as separate ops (``r + matmul_t``, as
    bench_decode_step's ``~noresid``), shows the count finds them (2 per layer, no such call)."""
    from jaxserve.models import layers

    model = _tiny_decoder("cpu")
    rows, layers_n, dim = 8, model.config.num_layers, model.config.hidden_size
    hlo = _decode_step_hlo(model, rows)
    assert hlo.count(f'custom_call_target="{build.ADD_TARGET}"') == 2 * layers_n
    assert _residual_adds(hlo, rows, dim) == 0
    monkeypatch.setattr(layers, "matmul_t_add",
                        lambda x, w, r, product="xla": r + products.matmul_t(x, w, product).astype(r.dtype))
    old = _decode_step_hlo(model, rows)
    assert f'custom_call_target="{build.ADD_TARGET}"' not in old and _residual_adds(old, rows, dim) == 2 * layers_n


def test_random_model_greedy_tokens_equal_the_reference_backend():
    """A tiny random Qwen2-like decoder with bf16 weights and f32 activations, greedy decoding by
    full recompute over right-padded rows (``hidden_states``): the cpu backend, whose weight
    products run on the GEMM, gives the reference backend's tokens (XLA's products) and close logits."""
    from flax import nnx

    models = {b: _tiny_decoder(b) for b in ("cpu", "reference")}
    cfg = models["cpu"].config
    assert models["cpu"].lm_head.product == "cpu_gemm" and models["reference"].lm_head.product == "xla"

    @nnx.jit
    def logits(model, tokens, mask):
        return model.lm_head(model.hidden_states(tokens, mask))

    hlo = {b: nnx.jit(lambda m, t, k: m.hidden_states(t, k)).lower(
        model, jnp.zeros((2, 24), jnp.int32), jnp.ones((2, 24), bool)).as_text() for b, model in models.items()}
    # per layer: q, k, v on the GEMM, gate and up with the SiLU gating in one gated call, o and down
    # accumulated into the residual stream
    assert _calls(hlo["cpu"], build.GATED_TARGET) == cfg.num_layers and _calls(hlo["cpu"], build.TARGET) > 0
    assert _calls(hlo["cpu"], build.ADD_TARGET) == 2 * cfg.num_layers
    assert all(_calls(hlo["reference"], t) == 0 for t in (build.GATED_TARGET, build.TARGET, build.ADD_TARGET))
    rng = np.random.RandomState(2)
    lens = [5, 9]
    tokens = {b: np.zeros((2, 24), np.int32) for b in models}
    for b in models:
        for r, n in enumerate(lens):
            tokens[b][r, :n] = rng.randint(3, 300, size=n) if b == "cpu" else tokens["cpu"][r, :n]
    for step in range(12):
        out = {}
        for b, model in models.items():
            mask = np.arange(24)[None, :] < np.asarray(lens)[:, None] + step
            out[b] = np.asarray(logits(model, jnp.asarray(tokens[b]), jnp.asarray(mask)))
            for r, n in enumerate(lens):
                tokens[b][r, n + step] = int(np.argmax(out[b][r, n + step - 1]))
        np.testing.assert_allclose(out["cpu"], out["reference"], rtol=1e-3, atol=1e-3)
    assert np.array_equal(tokens["cpu"], tokens["reference"])
    assert len({tuple(t) for t in tokens["cpu"]}) == 2
