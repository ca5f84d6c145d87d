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
// read from memory once per call. Each thread (the calling one and the helpers it schedules on XLA's
// intra-op pool, the FFI execution context's) owns a contiguous segment of blocks and runs them in
// order, then helps with the others' (run_segmented), so it knows the block it runs next: while
// working on one block it prefetches the next one's rows toward L2, a line per K step spread over
// the block's tiles (a burst at the block's start, or blocks alternating between threads, left the
// stream and the products unoverlapped: at 16 rows 1.25-1.6x slower, docs/benchmarks.md §15).
//
// The gated product (a second target, JaxserveCpuGatedGemm) is a gated MLP's first half in one call:
// h[M, F] (bf16) = silu(x . wg^T) * (x . wu^T) with wg, wu [F, K], rounded to nearest even once.
// Its work items are blocks of columns of h: the block's gate product, then its up product, each
// as the plain product's tiles into a per-thread f32 scratch (L1/L2-resident), then silu(g) * u in
// whole vectors (XLA's order: (g * (1 / (1 + exp(-g)))) * u). Interleaving the two matrices' tiles
// was 10-25 % slower at 16-64 rows, and SiLU in each tile's epilogue ~3 % slower at 64.
//
// The accumulating product (a third target, JaxserveCpuGemmAdd) is the plain one with y = r + x . w^T:
// r (f32 [M, N]) is aliased to y, and each tile's store adds its sums to what y holds (one f32 add,
// r + sum, as XLA's add of the plain product). It folds a decoder's residual adds into the store.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

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
  const uint16_t* up;  // the gated product's up matrix (w is its gate), else null
  float* y;            // the product; in the gated product's passes, one matrix's sums of a block
  uint16_t* h;         // the gated product's output, else null
  int64_t M, N, K;
  int64_t block;  // w rows per work item
  int64_t ldy;    // y's row stride
  int64_t y0;     // the column of w (and h) that y's column 0 holds
  bool add;       // the store adds the sums to y's values (the accumulating product), else overwrites
};

// Weight rows read later (the next block's, or the gated product's up block), asked for toward L2 a
// little at every K step of the current block's tiles. Empty (p == end): nothing to ask for.
struct Cursor {
  const char* p = nullptr;
  const char* end = nullptr;
  const char* target = nullptr;  // p catches up with it, one 64-byte line at a time
  int64_t per_step = 0;          // bytes target advances per K step

  void step() {
    target += per_step;
    for (; p < end && p < target; p += 64) __builtin_prefetch(p, 0, 2);
  }
};

// Lane r * NR + c: x row r . w row c (x rows [MR, K], w rows [NR, K], both with row stride K).
template <int MR, int NR>
vf tile(const uint16_t* x, const uint16_t* w, int64_t K, Cursor& pf) {
  static_assert(MR * NR <= L, "at most 16 accumulators");
  vf acc[L] = {};
  int64_t k = 0;
  for (; k + S <= K; k += S) {
    vk xv[MR];
    for (int r = 0; r < MR; ++r) xv[r] = load_k(x + r * K + k);
    pf.step();
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
  return reduce16(acc);
}

// silu(g) * u, lane by lane, in XLA's order; exp(-g) overflows to +inf as XLA's does (silu(g) = -0).
inline vf silu_mul(vf g, vf u) {
  const vf e = vexp(-g);
  const vf one = splat(1.0f);
  return g * (one / (one + (-g > splat(88.3f) ? splat(__builtin_inff()) : e))) * u;
}

// bfloat16 bits of each lane, rounded to nearest even as XLA's convert (NaN: a quiet NaN of its sign).
inline vi to_bf16(vf v) {
  typedef uint32_t vu32 __attribute__((vector_size(64)));
  vu32 u;
  std::memcpy(&u, &v, sizeof u);
  const vu32 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const vu32 nan = (u >> 16 & 0x8000u) | 0x7FC0u;
  return reinterpret_cast<vi>(v != v ? nan : rounded);
}

// Lanes r * NR + c of `sums` to y[r, c] (row stride ldy), or added to y[r, c] (y + sum, in f32).
template <int MR, int NR>
void store(vf sums, float* y, int64_t ldy, bool add) {
  float s[L];
  std::memcpy(s, &sums, sizeof s);
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) y[r * ldy + c] = add ? y[r * ldy + c] + s[r * NR + c] : s[r * NR + c];
}

// The tile of rows m .. m + MR and columns n .. n + NR of x . w^T, to y.
template <int MR, int NR>
void out_tile(const Gemm& g, int64_t m, int64_t n, Cursor& pf) {
  store<MR, NR>(tile<MR, NR>(g.x + m * g.K, g.w + n * g.K, g.K, pf), g.y + m * g.ldy + (n - g.y0), g.ldy,
                  g.add);
}

// NR = 8 for one or two x rows (decode: more weight rows in flight), 4 otherwise.
template <int MR>
constexpr int nr() { return MR <= 2 ? 8 : 4; }

template <int MR, int NR>
void tail_cols(const Gemm& g, int64_t m, int64_t n, int rest, Cursor& pf) {
  if constexpr (NR > 1) {
    if (rest == NR - 1) return out_tile<MR, NR - 1>(g, m, n, pf);
    return tail_cols<MR, NR - 1>(g, m, n, rest, pf);
  }
}

// Rows m .. m + MR of x against w rows n0 .. n1.
template <int MR>
void row_tile(const Gemm& g, int64_t m, int64_t n0, int64_t n1, Cursor& pf) {
  constexpr int NR = nr<MR>();
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) out_tile<MR, NR>(g, m, n, pf);
  if (n < n1) tail_cols<MR, NR>(g, m, n, static_cast<int>(n1 - n), pf);
}

// h[m, c] = silu(gate[m, c]) * up[m, c] for c < width (rows of stride ld, a multiple of L).
void gate_rows(const float* gate, const float* up, int64_t M, int64_t width, int64_t ld, uint16_t* h, int64_t ldh) {
  typedef uint16_t vh16 __attribute__((vector_size(2 * L)));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < width; c += L) {
      vf gv, uv;
      std::memcpy(&gv, gate + m * ld + c, sizeof gv);
      std::memcpy(&uv, up + m * ld + c, sizeof uv);
      const vh16 bits = __builtin_convertvector(to_bf16(silu_mul(gv, uv)), vh16);
      std::memcpy(h + m * ldh + c, &bits, std::min<int64_t>(L, width - c) * sizeof(uint16_t));
    }
}

// A Cursor over `rows` w rows at p that paces its prefetches to finish with the tiles of the block
// of columns n0 .. n1 (every tile's K steps); p null: an empty one.
Cursor spread_over(const Gemm& g, int64_t n0, int64_t n1, const uint16_t* p, int64_t rows) {
  Cursor c;
  if (!p || rows <= 0) return c;
  const int64_t nr = g.M <= 2 ? 8 : 4;
  const int64_t steps = std::max<int64_t>(1, (g.M + 3) / 4 * ((n1 - n0 + nr - 1) / nr) * (g.K / S));  // full steps
  const int64_t bytes = rows * g.K * static_cast<int64_t>(sizeof(uint16_t));
  c.p = c.target = reinterpret_cast<const char*>(p);
  c.end = c.p + bytes;
  c.per_step = (bytes + steps - 1) / steps;
  return c;
}

// Rows m .. M of x against w rows n0 .. n1, prefetching pf's rows meanwhile.
void run_rows(const Gemm& g, int64_t n0, int64_t n1, Cursor pf) {
  int64_t m = 0;
  for (; m + 4 <= g.M; m += 4) row_tile<4>(g, m, n0, n1, pf);
  switch (g.M - m) {
    case 3: row_tile<3>(g, m, n0, n1, pf); break;
    case 2: row_tile<2>(g, m, n0, n1, pf); break;
    case 1: row_tile<1>(g, m, n0, n1, pf); break;
    default: break;
  }
}

// The gated product's columns n0 .. n1: the gate's and then the up's sums into this thread's
// scratch (rows padded to whole vectors), then h from them. Each pass prefetches the rows the next
// one reads (up's block, then this thread's next gate block): switching matrices leaves the
// hardware prefetcher cold at every block.
void gated_block(const Gemm& g, int64_t n0, int64_t n1, int64_t next) {
  thread_local std::vector<float> sums;
  const int64_t ld = (n1 - n0 + L - 1) / L * L;
  sums.resize(2 * g.M * ld);
  Gemm pass = g;
  pass.up = nullptr;
  pass.ldy = ld;
  pass.y0 = n0;
  pass.y = sums.data();
  run_rows(pass, n0, n1, spread_over(g, n0, n1, g.up + n0 * g.K, n1 - n0));
  pass.w = g.up;
  pass.y = sums.data() + g.M * ld;
  const int64_t next_rows = next < 0 ? 0 : std::min(g.block, g.N - next);
  run_rows(pass, n0, n1, spread_over(g, n0, n1, next < 0 ? nullptr : g.w + next * g.K, next_rows));
  gate_rows(sums.data(), pass.y, g.M, n1 - n0, ld, g.h + n0, g.N);
}

// Item: w rows n0 .. n1 against all of x; `next` is the first w row of the block this thread runs
// next (-1: none). At 3+ rows the plain product prefetches that block's rows, a line per K step
// of this block's tiles (1-2 rows: each tile prefetches the next tile's rows itself).
void run_block(const Gemm& g, int64_t n0, int64_t n1, int64_t next) {
  if (g.up) return gated_block(g, n0, n1, next);
  const bool ahead = g.M > 2 && next >= 0;
  run_rows(g, n0, n1, spread_over(g, n0, n1, ahead ? g.w + next * g.K : nullptr,
                                  ahead ? std::min(g.block, g.N - next) : 0));
}

int max_threads() {
  static const int v = env_thread_cap("JAXSERVE_CPU_GEMM_THREADS");
  return v;
}

// w rows per work item: a multiple of 8 that keeps a block near 24 KiB (L1/L2-resident while every
// x row passes over it; the gated product's passes read one matrix's block each), and at least 4
// items per thread where N allows.
int64_t block_rows(int64_t N, int64_t K, int64_t threads) {
  int64_t rows = std::max<int64_t>(8, (24 * 1024 / (2 * std::max<int64_t>(K, 1))) / 8 * 8);
  const int64_t per_item = (N + 4 * threads - 1) / (4 * threads);
  return std::max<int64_t>(8, std::min(rows, (per_item + 7) / 8 * 8));
}

void run_all(const Gemm& g0, ffi::ThreadPool& pool) {
  const int64_t threads = pool_threads(pool, max_threads());
  const int64_t mats = g0.up ? 2 : 1;
  Gemm g = g0;
  g.block = block_rows(g.N, g.K, threads);
  const int64_t items = (g.N + g.block - 1) / g.block;
  // Small products (under ~64 K multiply-adds per extra thread) stay on the calling thread.
  const int64_t by_work = 1 + mats * g.M * g.N * g.K / (1 << 16);
  run_segmented(pool, items, std::min(threads, by_work), [g](int64_t i, int64_t next) {
    const int64_t n0 = i * g.block;
    run_block(g, n0, std::min(n0 + g.block, g.N), next < 0 ? -1 : next * g.block);
  });
}

// Checks x [M, K], w [N, K] and an output [M, N]; the Gemm of them (y or h set by the caller).
ffi::Error Problem(ffi::Buffer<ffi::BF16>& x, ffi::Buffer<ffi::BF16>& w, ffi::Span<const int64_t> out, Gemm* g) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || out.size() != 2 || xd[1] != wd[1] || out[0] != xd[0] || out[1] != wd[0])
    return ffi::Error::InvalidArgument("expected x [M, K], w [N, K] and an output [M, N]");
  *g = Gemm{reinterpret_cast<const uint16_t*>(x.untyped_data()), reinterpret_cast<const uint16_t*>(w.untyped_data()),
            nullptr, nullptr, nullptr, xd[0], wd[0], xd[1], 0, wd[0], 0, false};
  return ffi::Error::Success();
}

ffi::Error Handler(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                   ffi::Result<ffi::Buffer<ffi::F32>> y) {
  Gemm g;
  if (ffi::Error e = Problem(x, w, y->dimensions(), &g); e.failure()) return e;
  g.y = y->typed_data();
  if (g.M == 0 || g.N == 0) return ffi::Error::Success();
  if (g.K == 0) {
    std::memset(g.y, 0, g.M * g.N * sizeof(float));
    return ffi::Error::Success();
  }
  run_all(g, pool);
  return ffi::Error::Success();
}

// y = r + x . w^T with r aliased to y (XLA copies r first where the caller still needs it).
ffi::Error AddHandler(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                      ffi::Buffer<ffi::F32> r, ffi::Result<ffi::Buffer<ffi::F32>> y) {
  Gemm g;
  if (ffi::Error e = Problem(x, w, y->dimensions(), &g); e.failure()) return e;
  const auto rd = r.dimensions();
  if (rd.size() != 2 || rd[0] != g.M || rd[1] != g.N) return ffi::Error::InvalidArgument("expected r [M, N]");
  g.y = y->typed_data();
  g.add = true;
  if (r.typed_data() != g.y) std::memcpy(g.y, r.typed_data(), g.M * g.N * sizeof(float));
  if (g.M == 0 || g.N == 0) return ffi::Error::Success();
  if (g.K == 0) {  // r + 0 (-0 becomes +0, as XLA's add of an empty product)
    for (int64_t i = 0; i < g.M * g.N; ++i) g.y[i] += 0.0f;
    return ffi::Error::Success();
  }
  run_all(g, pool);
  return ffi::Error::Success();
}

ffi::Error GatedHandler(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> gate,
                        ffi::Buffer<ffi::BF16> up, ffi::Result<ffi::Buffer<ffi::BF16>> h) {
  const auto gd = gate.dimensions(), ud = up.dimensions();
  if (gd.size() != ud.size() || !std::equal(gd.begin(), gd.end(), ud.begin()))
    return ffi::Error::InvalidArgument("expected gate and up weights of one shape [F, K]");
  Gemm g;
  if (ffi::Error e = Problem(x, gate, h->dimensions(), &g); e.failure()) return e;
  g.up = reinterpret_cast<const uint16_t*>(up.untyped_data());
  g.h = reinterpret_cast<uint16_t*>(h->untyped_data());
  if (g.M == 0 || g.N == 0) return ffi::Error::Success();
  if (g.K == 0) {  // g = u = 0: silu(0) * 0 = +0
    std::memset(g.h, 0, g.M * g.N * sizeof(uint16_t));
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveCpuGatedGemm, GatedHandler,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveCpuGemmAdd, AddHandler,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
