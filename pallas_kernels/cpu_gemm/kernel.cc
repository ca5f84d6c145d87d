// Weight products for XLA:CPU, an XLA FFI custom call (see README.md beside pallas_kernels/).
//
// y[M, N] (f32) = x[M, K] (bf16) . w[N, K]^T (bf16), float32 accumulation. w is a checkpoint's
// [out, in] matrix as stored, read in place (no packing): K is contiguous in both x and w rows, so
// each output is a dot product along K. A register tile of MR x rows by NR w rows keeps MR * NR <= 16
// accumulators of 16 float lanes; after the K loop one transposing reduction (reduce16) sums their
// lanes. With AVX512-BF16 a step is vdpbf16ps over 32 K (pairs of bf16 products summed in f32);
// without it, 16 K widened to f32 and multiplied-added (same sums, other rounding order).
//
// Work items are blocks of consecutive w rows, each against ALL rows of x, so every weight byte is
// read from memory once per call; blocks are claimed in order by the calling thread and the helpers
// it schedules on XLA's intra-op thread pool (the FFI execution context's).

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

#include "cpu_shared.h"  // pallas_kernels/cpu_common: vf, reduce16, run_claimed

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512BF16__)
constexpr int S = 32;  // K per step
typedef __m512i vk;
inline vk load_k(const uint16_t* p) { return _mm512_loadu_si512(p); }
inline vk load_k_tail(const uint16_t* p, int n) {  // the first n < S elements, zeros after
  return _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1u << n) - 1u), p);
}
inline vf dot(vf acc, vk a, vk b) {
  return reinterpret_cast<vf>(_mm512_dpbf16_ps(reinterpret_cast<__m512>(acc), reinterpret_cast<__m512bh>(a),
                                               reinterpret_cast<__m512bh>(b)));
}
constexpr bool kNativeBf16 = true;
#else
constexpr int S = 16;
typedef vf vk;  // 16 bf16 widened to float
typedef uint16_t vh __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(64)));
inline vk widen(vh h) { return reinterpret_cast<vf>(__builtin_convertvector(h, vu) << 16); }
inline vk load_k(const uint16_t* p) { vh h; std::memcpy(&h, p, sizeof h); return widen(h); }
inline vk load_k_tail(const uint16_t* p, int n) { vh h{}; std::memcpy(&h, p, n * sizeof(uint16_t)); return widen(h); }
inline vf dot(vf acc, vk a, vk b) { return acc + a * b; }
constexpr bool kNativeBf16 = false;
#endif

struct Gemm {
  const uint16_t* x;
  const uint16_t* w;
  float* y;
  int64_t M, N, K;
  int64_t block;  // w rows per work item
};

// y[MR x NR] = x rows [MR, K] . w rows [NR, K]^T; both with row stride K, y with row stride ldy.
template <int MR, int NR>
void tile(const uint16_t* x, const uint16_t* w, int64_t K, float* y, int64_t ldy) {
  static_assert(MR * NR <= L, "at most 16 accumulators");
  vf acc[L] = {};
  int64_t k = 0;
  for (; k + S <= K; k += S) {
    vk xv[MR];
    for (int r = 0; r < MR; ++r) xv[r] = load_k(x + r * K + k);
    for (int c = 0; c < NR; ++c) {
      if constexpr (MR <= 2) __builtin_prefetch(w + (NR + c) * K + k);  // the next tile's rows (decode)
      const vk wv = load_k(w + c * K + k);
      for (int r = 0; r < MR; ++r) acc[r * NR + c] = dot(acc[r * NR + c], xv[r], wv);
    }
  }
  if (k < K) {
    const int n = static_cast<int>(K - k);
    vk xv[MR];
    for (int r = 0; r < MR; ++r) xv[r] = load_k_tail(x + r * K + k, n);
    for (int c = 0; c < NR; ++c) {
      const vk wv = load_k_tail(w + c * K + k, n);
      for (int r = 0; r < MR; ++r) acc[r * NR + c] = dot(acc[r * NR + c], xv[r], wv);
    }
  }
  float s[L];
  const vf sums = reduce16(acc);
  std::memcpy(s, &sums, sizeof s);
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) y[r * ldy + c] = s[r * NR + c];
}

// NR = 8 for one or two x rows (decode: more weight rows in flight), 4 otherwise.
template <int MR>
constexpr int nr() { return MR <= 2 ? 8 : 4; }

template <int MR, int NR>
void tail_cols(const Gemm& g, const uint16_t* x, int64_t n, int rest, float* y) {
  if constexpr (NR > 1) {
    if (rest == NR - 1) return tile<MR, NR - 1>(x, g.w + n * g.K, g.K, y, g.N);
    return tail_cols<MR, NR - 1>(g, x, n, rest, y);
  }
}

// Rows m .. m + MR of x against w rows n0 .. n1.
template <int MR>
void row_tile(const Gemm& g, int64_t m, int64_t n0, int64_t n1) {
  constexpr int NR = nr<MR>();
  const uint16_t* x = g.x + m * g.K;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) tile<MR, NR>(x, g.w + n * g.K, g.K, g.y + m * g.N + n, g.N);
  if (n < n1) tail_cols<MR, NR>(g, x, n, static_cast<int>(n1 - n), g.y + m * g.N + n);
}

void run_block(const Gemm& g, int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; m + 4 <= g.M; m += 4) row_tile<4>(g, m, n0, n1);
  switch (g.M - m) {
    case 3: row_tile<3>(g, m, n0, n1); break;
    case 2: row_tile<2>(g, m, n0, n1); break;
    case 1: row_tile<1>(g, m, n0, n1); break;
    default: break;
  }
}

int max_threads() {
  static const int v = env_thread_cap("JAXSERVE_CPU_GEMM_THREADS");
  return v;
}

// w rows per work item: a multiple of 8 that keeps a block near 48 KiB (L1/L2-resident while every
// x row passes over it), and at least 4 items per thread where N allows.
int64_t block_rows(int64_t N, int64_t K, int64_t threads) {
  int64_t rows = std::max<int64_t>(8, (24 * 1024 / (2 * std::max<int64_t>(K, 1))) / 8 * 8);
  const int64_t per_item = (N + 4 * threads - 1) / (4 * threads);
  return std::max<int64_t>(8, std::min(rows, (per_item + 7) / 8 * 8));
}

void run_all(const Gemm& g0, ffi::ThreadPool& pool) {
  const int64_t threads = pool_threads(pool, max_threads());
  Gemm g = g0;
  g.block = block_rows(g.N, g.K, threads);
  const int64_t items = (g.N + g.block - 1) / g.block;
  // Small products (under ~64 K multiply-adds per extra thread) stay on the calling thread.
  const int64_t by_work = 1 + g.M * g.N * g.K / (1 << 16);
  run_claimed(pool, items, std::min(threads, by_work), [g](int64_t i) {
    const int64_t n0 = i * g.block;
    run_block(g, n0, std::min(n0 + g.block, g.N));
  });
}

ffi::Error Handler(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                ffi::Result<ffi::Buffer<ffi::F32>> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || xd[1] != wd[1] || yd[0] != xd[0] || yd[1] != wd[0])
    return ffi::Error::InvalidArgument("expected x [M, K], w [N, K] and y [M, N]");
  const Gemm g{reinterpret_cast<const uint16_t*>(x.untyped_data()), reinterpret_cast<const uint16_t*>(w.untyped_data()),
               y->typed_data(), xd[0], wd[0], xd[1], 0};
  if (g.M == 0 || g.N == 0) return ffi::Error::Success();
  if (g.K == 0) {
    std::memset(g.y, 0, g.M * g.N * sizeof(float));
    return ffi::Error::Success();
  }
  run_all(g, pool);
  return ffi::Error::Success();
}

}  // namespace

extern "C" int JaxserveCpuGemmNativeBf16() { return kNativeBf16 ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveCpuGemm, Handler,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
