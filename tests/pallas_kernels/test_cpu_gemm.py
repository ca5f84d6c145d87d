"""The CPU GEMM kernel (C++, XLA FFI) against a float32 product of the same bf16 inputs, its gated
product (a gated MLP's gate and up products and SiLU gating) against float64 and XLA's ops, the
``cpu`` backend's weight products (``models/products.py``) in a model, and the fallback when it
cannot be built."""

from __future__ import annotations

import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.models import products
from jaxserve.pallas_kernels.cpu_ffi_build import cache_dir
from jaxserve.pallas_kernels.cpu_gemm import build
from jaxserve.pallas_kernels.cpu_gemm.ops import cpu_gated_gemm, cpu_gemm
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



def test_random_model_greedy_tokens_equal_the_reference_backend():
    """A tiny random Qwen2-like decoder with bf16 weights and f32 activations, greedy decoding by
    full recompute over right-padded rows (``hidden_states``): the cpu backend, whose weight
    products run on the GEMM, gives the reference backend's tokens (XLA's products) and close logits."""
    from flax import nnx

    from jaxserve.models.config import ModelConfig
    from jaxserve.models.decoder import DecoderForCausalLM

    cfg = ModelConfig("Qwen2ForCausalLM", vocab_size=301, hidden_size=96, intermediate_size=200, num_layers=2,
                      num_heads=6, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e4,
                      max_position_embeddings=64, qkv_bias=True)
    models = {b: DecoderForCausalLM(cfg, dtype=jnp.bfloat16, compute_dtype=jnp.float32, backend=b, rngs=nnx.Rngs(0))
              for b in ("cpu", "reference")}
    assert models["cpu"].lm_head.product == "cpu_gemm" and models["reference"].lm_head.product == "xla"

    @nnx.jit
    def logits(model, tokens, mask):
        return model.lm_head(model.hidden_states(tokens, mask))

    hlo = {b: nnx.jit(lambda m, t, k: m.hidden_states(t, k)).lower(
        model, jnp.zeros((2, 24), jnp.int32), jnp.ones((2, 24), bool)).as_text() for b, model in models.items()}
    # per layer: q, k, v, o and down on the GEMM, gate and up with the SiLU gating in one gated call
    assert _calls(hlo["cpu"], build.GATED_TARGET) == cfg.num_layers and _calls(hlo["cpu"], build.TARGET) > 0
    assert _calls(hlo["reference"], build.GATED_TARGET) == 0 == _calls(hlo["reference"], build.TARGET)
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
