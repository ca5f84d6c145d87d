// Ragged paged attention for XLA:CPU, an XLA FFI custom call (see README.md in this directory).
//
// Semantics: ref_ragged_paged_attention (pallas_kernels/ragged_paged_attention/reference.py) over
// the per-sequence metadata: sequence b owns the flat queries qsl[b] .. qsl[b+1], which are the last
// q_len of its seq_lens[b] KV positions, stored in pages block_tables[b, :] of [P, S, K, H] pages.
// Query i of b attends causally to positions <= seq_lens[b] - q_len + i. GQA: query head n reads KV
// head n / G. Tokens past qsl[B] (padding) get zeros. Softmax in float32. Pages: float32, or
// bfloat16 (as such or as its bits, uint16), converted in registers.
//
// Work items: a decode sequence (one query) over its KV heads, rows read in place from the pages
// (run_decode); else (sequence, KV head, block of up to kQueryBlock queries), whose KV tiles are
// converted to float32 once for all its G * queries rows (run_item, online softmax). Items are
// shared by the calling thread and the helpers it schedules on XLA's intra-op thread pool (the FFI
// execution context's).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int L = 16;           // float lanes per vector
constexpr int C = 32;           // KV tokens per tile
constexpr int NC = C / L;       // vectors per tile row
constexpr int kQueryBlock = 16; // queries per work item (prefill)
constexpr int kDotRows = 8;     // items with at most this many rows use per-token dot products

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

inline vf splat(float x) { return vf{} + x; }
inline vf loadu(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

inline float hsum(vf v) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  v8 a, b;
  std::memcpy(&a, &v, 32);
  std::memcpy(&b, reinterpret_cast<const char*>(&v) + 32, 32);
  a += b;
  v4 c, d;
  std::memcpy(&c, &a, 16);
  std::memcpy(&d, reinterpret_cast<const char*>(&a) + 16, 16);
  c += d;
  return (c[0] + c[2]) + (c[1] + c[3]);
}

inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) {
  const uint32_t u = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float hmax(vf v) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  v8 a, b;
  std::memcpy(&a, &v, 32);
  std::memcpy(&b, reinterpret_cast<const char*>(&v) + 32, 32);
  a = a > b ? a : b;
  v4 c, d;
  std::memcpy(&c, &a, 16);
  std::memcpy(&d, reinterpret_cast<const char*>(&a) + 16, 16);
  c = c > d ? c : d;
  return std::max(std::max(c[0], c[2]), std::max(c[1], c[3]));
}

// out[i] = sum of a[i]'s lanes, for 16 vectors (a transposing reduction tree: 15 pairs of shuffles).
inline vf reduce16(vf* a) {
  const vi even = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const vi odd = even + 1;
  for (int w = L / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i)
      a[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], even) + __builtin_shuffle(a[2 * i], a[2 * i + 1], odd);
  return a[0];
}

// exp(x) for x <= 0 (Cephes' polynomial, ~1 ulp); x < -87.3 (and -inf) gives exactly 0.
inline vf vexp(vf x) {
  const vi under = x < splat(-87.3f);
  x = x < splat(-87.3f) ? splat(-87.3f) : x;
  x = x > splat(88.3f) ? splat(88.3f) : x;
  vf fx = x * 1.44269504088896341f + 0.5f;
  vf fl = __builtin_convertvector(__builtin_convertvector(fx, vi), vf);
  fl = fl > fx ? fl - 1.0f : fl;  // floor
  const vi n = __builtin_convertvector(fl, vi);
  x = x - fl * 0.693359375f + fl * 2.12194440e-4f;
  const vf z = x * x;
  vf y = splat(1.9875691500e-4f);
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  const vi e = (n + 127) << 23;
  vf p2;
  std::memcpy(&p2, &e, sizeof p2);
  y *= p2;
  return under ? splat(0.0f) : y;
}

// Element types: float, or bfloat16 as its bits (uint16_t). load(p): L elements as floats.
inline vf load(const float* p) { return loadu(p); }
inline vf load(const uint16_t* p) {
  typedef uint16_t vh __attribute__((vector_size(2 * L)));
  vh h;
  std::memcpy(&h, p, sizeof h);
  const vi w = __builtin_convertvector(h, vi) << 16;
  vf f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}
template <typename T>
inline void to_f32(const T* src, float* dst, int n) {
  int i = 0;
  for (; i + L <= n; i += L) storeu(dst + i, load(src + i));
  for (; i < n; ++i) dst[i] = load1(src + i);
}
inline void from_f32(const float* src, float* dst, int n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void from_f32(const float* src, uint16_t* dst, int n) {  // round to nearest even, like XLA's convert
  for (int i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, 4);
    dst[i] = std::isnan(src[i]) ? static_cast<uint16_t>((u >> 16) | 0x40) : static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
  }
}

struct Item {  // queries q0 .. q0 + nq of sequence b, KV heads kh .. kh_end
  int b, kh, kh_end, q0, nq;
  int64_t cost;
  bool decode;  // one query whose rows are read in place (run_decode), else run_item's tiles
};

struct Problem {
  const void* q;
  const void* k;
  const void* v;
  const int32_t* qsl;
  const int32_t* seq_lens;
  const int32_t* tables;
  void* out;
  int64_t T, N, H, P, S, K, B, W;
  float scale;
  size_t elem;  // bytes per q / out element
  std::vector<Item> items;
};

struct Scratch {  // per thread, grown on demand
  std::vector<float> q, kt, kv, vv, s, acc, m, l;
  std::vector<int> pos;
  std::vector<int64_t> off;
};

// S[r, :] = Q[r, :] . KT[:, :] for NR rows (KT is [Hp, C], rows of Q are Hp long).
template <int NR>
inline void qk_rows(const float* Q, const float* KT, float* S, int Hp) {
  vf a[NR][NC] = {};
  for (int h = 0; h < Hp; ++h) {
    vf k[NC];
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) k[c] = loadu(KT + h * C + c * L);
#pragma GCC unroll 8
    for (int i = 0; i < NR; ++i) {
      const vf q = splat(Q[i * Hp + h]);
#pragma GCC unroll 4
      for (int c = 0; c < NC; ++c) a[i][c] += q * k[c];
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int c = 0; c < NC; ++c) storeu(S + i * C + c * L, a[i][c]);
}

// S[r, 0:L] = Q[r, :] . Kbuf[j, :] for R rows and L tokens (Kbuf is [L, Hp]).
inline void qk_dots(const float* Q, int R, const float* Kbuf, float* S, int Hp) {
  for (int r = 0; r < R; ++r) {
    vf a[L] = {};
    for (int h = 0; h < Hp; h += L) {
      const vf q = loadu(Q + r * Hp + h);
#pragma GCC unroll 16
      for (int j = 0; j < L; ++j) a[j] += q * loadu(Kbuf + j * Hp + h);
    }
    storeu(S + r * C, reduce16(a));
  }
}

// acc[r, h0 : h0 + NV * L] += sum_j P[r, j] V[j, h0 : ...] for NR rows, j < n.
template <int NR, int NV>
inline void pv_rows(float* acc, const float* P, const float* V, int Hp, int h0, int n) {
  vf a[NR][NV];
  for (int i = 0; i < NR; ++i)
    for (int v = 0; v < NV; ++v) a[i][v] = loadu(acc + i * Hp + h0 + v * L);
  for (int j = 0; j < n; ++j) {
    vf vv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vv[v] = loadu(V + j * Hp + h0 + v * L);
#pragma GCC unroll 4
    for (int i = 0; i < NR; ++i) {
      const vf p = splat(P[i * C + j]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) a[i][v] += p * vv[v];
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int v = 0; v < NV; ++v) storeu(acc + i * Hp + h0 + v * L, a[i][v]);
}

template <int NR>
inline void pv_rows_all(float* acc, const float* P, const float* V, int Hp, int n) {
  int h0 = 0;
  for (; h0 + 4 * L <= Hp; h0 += 4 * L) pv_rows<NR, 4>(acc, P, V, Hp, h0, n);
  for (; h0 < Hp; h0 += L) pv_rows<NR, 1>(acc, P, V, Hp, h0, n);
}

// Online-softmax update of rows [0, R) with this tile's scores S (tokens t0 .. t0 + C).
inline void softmax_tile(Scratch& s, int R, int Hp, int t0) {
  vi tok[NC];
  for (int c = 0; c < NC; ++c)
    for (int i = 0; i < L; ++i) tok[c][i] = t0 + c * L + i;
  const vf ninf = splat(-std::numeric_limits<float>::infinity());
  for (int r = 0; r < R; ++r) {
    float* row = s.s.data() + r * C;
    vf x[NC];
    float mt = -std::numeric_limits<float>::infinity();
    for (int c = 0; c < NC; ++c) {
      x[c] = tok[c] <= s.pos[r] ? loadu(row + c * L) : ninf;
      mt = std::max(mt, hmax(x[c]));
    }
    const float m_old = s.m[r];
    const float m_new = std::max(m_old, mt);  // finite: a row's first tile holds position 0
    vf sum = {};
    for (int c = 0; c < NC; ++c) {
      const vf p = vexp(x[c] - m_new);
      sum += p;
      storeu(row + c * L, p);
    }
    if (m_old != m_new) {
      const float alpha = m_old == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(m_old - m_new);
      s.l[r] *= alpha;
      const vf va = splat(alpha);
      float* a = s.acc.data() + r * Hp;
      for (int h = 0; h < Hp; h += L) storeu(a + h, loadu(a + h) * va);
      s.m[r] = m_new;
    }
    s.l[r] += hsum(sum);
  }
}

// Asks for the K/V rows of tokens [t0, t1) of KV heads [kh, kh_end) ahead of their use (the pages are scattered).
template <typename KVT>
inline void prefetch_tile(const Problem& p, int64_t kh, int64_t kh_end, const int32_t* table, int64_t t0, int64_t t1) {
  const KVT* kp = static_cast<const KVT*>(p.k);
  const KVT* vp = static_cast<const KVT*>(p.v);
  const int64_t bytes = (kh_end - kh) * p.H * static_cast<int64_t>(sizeof(KVT));
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t page = std::min<int64_t>(std::max<int32_t>(table[t / p.S], 0), p.P - 1);
    const int64_t off = ((page * p.S + t % p.S) * p.K + kh) * p.H;
    for (int64_t b = 0; b < bytes; b += 64) {
      __builtin_prefetch(reinterpret_cast<const char*>(kp + off) + b);
      __builtin_prefetch(reinterpret_cast<const char*>(vp + off) + b);
    }
  }
}

constexpr int64_t kAhead = 2 * C;  // decode: tokens between a row's prefetch and its use

template <typename KVT>
inline void prefetch_rows(const KVT* base, const int64_t* off, int64_t t0, int64_t t1, int64_t bytes) {
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(base + off[t]) + b, 0, 2);
}

// sc[r, t] = q[r] . K[t, r / G] for the item's R = nkh * G rows (q rows NH * L long, sc rows Tp
// long) and tokens t < n, 16 tokens at a time; token t's heads start at kp + off[t].
template <int NH, typename KVT>
void decode_scores(const KVT* kp, const KVT* vp, const int64_t* off, int64_t n, const float* q, int G, int nkh,
                   float* sc, int64_t Tp) {
  const int64_t bytes = nkh * NH * L * static_cast<int64_t>(sizeof(KVT));
  prefetch_rows(kp, off, 0, std::min(kAhead, n), bytes);  // tokens [0, 2n): K's rows, then V's
  prefetch_rows(vp, off, 0, std::clamp<int64_t>(kAhead - n, 0, n), bytes);
  for (int64_t t0 = 0; t0 < n; t0 += L) {
    const int64_t a = t0 + kAhead, b = a + L;
    prefetch_rows(kp, off, std::min(a, n), std::min(b, n), bytes);
    prefetch_rows(vp, off, std::clamp<int64_t>(a - n, 0, n), std::clamp<int64_t>(b - n, 0, n), bytes);
    const int64_t last = std::min<int64_t>(L, n - t0) - 1;  // tokens past n repeat the last one
    for (int kh = 0; kh < nkh; ++kh) {
      for (int g = 0; g < G; ++g) {
        const int r = kh * G + g;
        vf qv[NH], a[L];
        for (int h = 0; h < NH; ++h) qv[h] = loadu(q + r * NH * L + h * L);
#pragma GCC unroll 16
        for (int j = 0; j < L; ++j) {
          const KVT* kr = kp + off[t0 + std::min<int64_t>(j, last)] + kh * NH * L;
          vf acc = qv[0] * load(kr);
          for (int h = 1; h < NH; ++h) acc += qv[h] * load(kr + h * L);
          a[j] = acc;
        }
        storeu(sc + r * Tp + t0, reduce16(a));
      }
    }
  }
}

// acc[i] += sum_t P[i, t] V[t] for RB rows (acc rows NH * L long, P rows Tp long), tokens [t0, t1).
template <int NH, int RB, typename KVT>
inline void decode_pv_rows(float* acc, const float* P, int64_t Tp, const KVT* vp, const int64_t* off, int64_t t0,
                           int64_t t1) {
  vf a[RB][NH];
  for (int i = 0; i < RB; ++i)
    for (int h = 0; h < NH; ++h) a[i][h] = loadu(acc + i * NH * L + h * L);
  for (int64_t t = t0; t < t1; ++t) {
    const KVT* vr = vp + off[t];
    vf v[NH];
    for (int h = 0; h < NH; ++h) v[h] = load(vr + h * L);
    for (int i = 0; i < RB; ++i) {
      const vf pi = splat(P[i * Tp + t]);
      for (int h = 0; h < NH; ++h) a[i][h] += pi * v[h];
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int h = 0; h < NH; ++h) storeu(acc + i * NH * L + h * L, a[i][h]);
}

// acc[r] = sum_t P[r, t] V[t, r / G] over tokens t < n, in tiles of C tokens whose rows stay cached
// across the item's heads.
template <int NH, typename KVT>
void decode_pv(const KVT* vp, const int64_t* off, int64_t n, const float* P, int G, int nkh, float* acc,
               int64_t Tp) {
  constexpr int RB = NH >= 8 ? 2 : 4;  // rows per pass: RB * NH accumulators in registers
  const int64_t bytes = nkh * NH * L * static_cast<int64_t>(sizeof(KVT));
  for (int64_t t0 = 0; t0 < n; t0 += C) {
    const int64_t t1 = std::min<int64_t>(t0 + C, n);
    prefetch_rows(vp, off, std::min(t0 + kAhead, n), std::min(t0 + kAhead + C, n), bytes);
    for (int kh = 0; kh < nkh; ++kh) {
      const KVT* vh = vp + kh * NH * L;
      for (int g = 0; g < G;) {
        const int r = kh * G + g;
        float* ar = acc + r * NH * L;
        const float* pr = P + r * Tp;
        switch (std::min(G - g, RB)) {
          case 1: decode_pv_rows<NH, 1>(ar, pr, Tp, vh, off, t0, t1); g += 1; break;
          case 2: decode_pv_rows<NH, 2>(ar, pr, Tp, vh, off, t0, t1); g += 2; break;
          case 3: decode_pv_rows<NH, 3>(ar, pr, Tp, vh, off, t0, t1); g += 3; break;
          default: decode_pv_rows<NH, RB>(ar, pr, Tp, vh, off, t0, t1); g += RB; break;
        }
      }
    }
  }
}

// Softmax of each of R rows of sc over its first n scores, in place (the rest: 0); returns 1 / sum in inv.
inline void decode_softmax(float* sc, int R, int64_t n, int64_t Tp, float* inv) {
  const vf ninf = splat(-std::numeric_limits<float>::infinity());
  vi lane;
  for (int i = 0; i < L; ++i) lane[i] = i;
  for (int r = 0; r < R; ++r) {
    float* row = sc + r * Tp;
    if (n % L) {  // the last vector's lanes past n
      const vi tok = lane + static_cast<int32_t>(n / L * L);
      storeu(row + n / L * L, tok < static_cast<int32_t>(n) ? loadu(row + n / L * L) : ninf);
    }
    vf mv = ninf;
    for (int64_t t = 0; t < Tp; t += L) {
      const vf x = loadu(row + t);
      mv = x > mv ? x : mv;
    }
    const vf m = splat(hmax(mv));
    vf sum = {};
    for (int64_t t = 0; t < Tp; t += L) {
      const vf e = vexp(loadu(row + t) - m);
      sum += e;
      storeu(row + t, e);
    }
    inv[r] = 1.0f / hsum(sum);  // >= 1: the max's own term
  }
}

// The one query of sequence it.b (at position seq_len - 1: every token is visible), KV heads
// [it.kh, it.kh_end): scores over all K rows, softmax, then P.V over all V rows, each row read in
// place from its page (bf16 converted in registers). H = NH * L.
template <int NH, typename KVT, typename QT>
void run_decode(const Problem& p, const Item& it, Scratch& s) {
  constexpr int H = NH * L;
  const int G = p.N / p.K, nkh = it.kh_end - it.kh, R = nkh * G;
  const int64_t n = p.seq_lens[it.b], Tp = (n + L - 1) / L * L, qi = p.qsl[it.b];
  const int32_t* table = p.tables + it.b * p.W;
  s.off.resize(n);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t page = std::min<int64_t>(std::max<int32_t>(table[t / p.S], 0), p.P - 1);
    s.off[t] = ((page * p.S + t % p.S) * p.K + it.kh) * H;
  }
  s.q.resize(static_cast<size_t>(R) * H);
  const QT* q = static_cast<const QT*>(p.q) + (qi * p.N + it.kh * G) * H;
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < NH; ++h) storeu(s.q.data() + r * H + h * L, load(q + r * H + h * L) * p.scale);
  s.s.resize(static_cast<size_t>(R) * Tp);
  s.l.resize(R);
  s.acc.assign(static_cast<size_t>(R) * H, 0.0f);
  const KVT* kp = static_cast<const KVT*>(p.k);
  const KVT* vp = static_cast<const KVT*>(p.v);
  decode_scores<NH>(kp, vp, s.off.data(), n, s.q.data(), G, nkh, s.s.data(), Tp);
  decode_softmax(s.s.data(), R, n, Tp, s.l.data());
  decode_pv<NH>(vp, s.off.data(), n, s.s.data(), G, nkh, s.acc.data(), Tp);
  QT* out = static_cast<QT*>(p.out) + (qi * p.N + it.kh * G) * H;
  for (int r = 0; r < R; ++r) {
    float* a = s.acc.data() + r * H;
    for (int h = 0; h < NH; ++h) storeu(a + h * L, loadu(a + h * L) * s.l[r]);
    from_f32(a, out + r * H, H);
  }
}

template <typename KVT, typename QT>
void run_item(const Problem& p, const Item& it, Scratch& s) {
  const int H = p.H, S = p.S, K = p.K, G = p.N / p.K;
  const int Hp = (H + L - 1) / L * L;
  const int R = it.nq * G;
  const int64_t qs = p.qsl[it.b], q_len = p.qsl[it.b + 1] - qs;
  const int64_t first_pos = p.seq_lens[it.b] - q_len + it.q0;
  const int64_t kv_end = first_pos + it.nq;  // the block's last query's position + 1
  s.q.assign(static_cast<size_t>(R) * Hp, 0.0f);
  s.acc.assign(static_cast<size_t>(R) * Hp, 0.0f);
  s.m.assign(R, -std::numeric_limits<float>::infinity());
  s.l.assign(R, 0.0f);
  s.pos.resize(R);
  s.s.resize(static_cast<size_t>(R) * C);
  s.kt.resize(static_cast<size_t>(Hp) * C);
  s.kv.resize(static_cast<size_t>(C) * Hp);  // rows past a tile's tokens are zeroed below
  s.vv.resize(static_cast<size_t>(C) * Hp);
  const QT* q = static_cast<const QT*>(p.q);
  for (int i = 0; i < it.nq; ++i) {
    for (int g = 0; g < G; ++g) {
      const int r = i * G + g;
      float* dst = s.q.data() + r * Hp;
      to_f32(q + ((qs + it.q0 + i) * p.N + it.kh * G + g) * H, dst, H);
      for (int h = 0; h < H; ++h) dst[h] *= p.scale;
      s.pos[r] = static_cast<int>(first_pos + i);
    }
  }
  const KVT* kp = static_cast<const KVT*>(p.k);
  const KVT* vp = static_cast<const KVT*>(p.v);
  const int32_t* table = p.tables + it.b * p.W;
  const bool dots = R <= kDotRows;
  for (int64_t t0 = 0; t0 < kv_end; t0 += C) {
    const int n = static_cast<int>(std::min<int64_t>(C, kv_end - t0));
    prefetch_tile<KVT>(p, it.kh, it.kh + 1, table, t0 + C, std::min<int64_t>(t0 + 2 * C, kv_end));
    int64_t pi = t0 / S, slot = t0 % S;
    for (int j = 0; j < n; ++j) {
      const int64_t page = std::min<int64_t>(std::max<int32_t>(table[pi], 0), p.P - 1);
      const int64_t off = ((page * S + slot) * K + it.kh) * H;
      if (++slot == S) slot = 0, ++pi;
      to_f32(kp + off, s.kv.data() + j * Hp, H);
      to_f32(vp + off, s.vv.data() + j * Hp, H);
      if (Hp != H) {
        std::fill_n(s.kv.data() + j * Hp + H, Hp - H, 0.0f);
        std::fill_n(s.vv.data() + j * Hp + H, Hp - H, 0.0f);
      }
    }
    if (n < C) {  // the last tile: stale rows past n must not reach the output (0 * NaN)
      std::fill(s.kv.begin() + n * Hp, s.kv.end(), 0.0f);
      std::fill(s.vv.begin() + n * Hp, s.vv.end(), 0.0f);
    }
    if (dots) {
      for (int j0 = 0; j0 < n; j0 += L) qk_dots(s.q.data(), R, s.kv.data() + j0 * Hp, s.s.data() + j0, Hp);
    } else {
      for (int j = 0; j < C; ++j)
        for (int h = 0; h < Hp; ++h) s.kt[h * C + j] = s.kv[j * Hp + h];
      int r = 0;
      for (; r + 8 <= R; r += 8) qk_rows<8>(s.q.data() + r * Hp, s.kt.data(), s.s.data() + r * C, Hp);
      for (; r < R; ++r) qk_rows<1>(s.q.data() + r * Hp, s.kt.data(), s.s.data() + r * C, Hp);
    }
    softmax_tile(s, R, Hp, static_cast<int>(t0));
    int r = 0;
    for (; r + 4 <= R; r += 4) pv_rows_all<4>(s.acc.data() + r * Hp, s.s.data() + r * C, s.vv.data(), Hp, n);
    float* acc = s.acc.data() + r * Hp;
    const float* pr = s.s.data() + r * C;
    switch (R - r) {
      case 3: pv_rows_all<3>(acc, pr, s.vv.data(), Hp, n); break;
      case 2: pv_rows_all<2>(acc, pr, s.vv.data(), Hp, n); break;
      case 1: pv_rows_all<1>(acc, pr, s.vv.data(), Hp, n); break;
      default: break;
    }
  }
  QT* out = static_cast<QT*>(p.out);
  for (int i = 0; i < it.nq; ++i) {
    for (int g = 0; g < G; ++g) {
      const int r = i * G + g;
      float* a = s.acc.data() + r * Hp;
      const float inv = s.l[r] > 0 ? 1.0f / s.l[r] : 0.0f;
      for (int h = 0; h < H; ++h) a[h] *= inv;
      from_f32(a, out + ((qs + it.q0 + i) * p.N + it.kh * G + g) * H, H);
    }
  }
}

// NH where run_decode takes head_dim H = NH * L, else 0.
inline int decode_nh(int64_t H) { return H == 2 * L || H == 4 * L || H == 8 * L ? static_cast<int>(H / L) : 0; }

// Decode sequences are one item each (all KV heads: a token's rows are one contiguous run), split
// by KV head when there are too few of them to keep the threads busy; prefill blocks of
// kQueryBlock queries are one item per KV head. Most costly first.
void build_items(Problem& p, int64_t threads) {
  int64_t decodes = 0;
  for (int64_t b = 0; b < p.B; ++b) decodes += std::min<int64_t>(p.qsl[b + 1], p.T) - p.qsl[b] == 1;
  const int split = decodes < 4 * threads ? 1 : static_cast<int>(p.K);
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t q_len = std::min<int64_t>(p.qsl[b + 1], p.T) - p.qsl[b];
    const int64_t seq_len = p.seq_lens[b];
    if (q_len <= 0) continue;
    if (seq_len < q_len || seq_len > p.W * p.S) {  // inconsistent metadata: zeros, never a stray read
      std::memset(static_cast<char*>(p.out) + p.qsl[b] * p.N * p.H * p.elem, 0, q_len * p.N * p.H * p.elem);
      continue;
    }
    if (q_len == 1 && decode_nh(p.H)) {
      for (int kh = 0; kh < p.K; kh += split) {
        const int end = std::min<int>(kh + split, static_cast<int>(p.K));
        p.items.push_back({static_cast<int>(b), kh, end, 0, 1, (seq_len + C) * (end - kh), true});
      }
      continue;
    }
    for (int64_t q0 = 0; q0 < q_len; q0 += kQueryBlock) {
      const int nq = static_cast<int>(std::min<int64_t>(kQueryBlock, q_len - q0));
      const int64_t cost = nq * (seq_len - q_len + q0 + nq + C);
      for (int kh = 0; kh < p.K; ++kh)
        p.items.push_back({static_cast<int>(b), kh, kh + 1, static_cast<int>(q0), nq, cost, false});
    }
  }
  std::stable_sort(p.items.begin(), p.items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
}

// Items claimed one at a time by the caller and its helpers; a helper that starts late finds
// nothing left and never touches the problem (which lives on the caller's stack).
struct Claims {
  explicit Claims(int64_t n) : n(n) {}
  const int64_t n;  // never read the problem before claiming an item: it may be gone
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

template <typename KVT, typename QT>
void drain(const Problem* p, Claims* c) {
  thread_local Scratch scratch;
  for (int64_t i; (i = c->next.fetch_add(1)) < c->n;) {
    if (i + 1 < c->n) {  // the next item's first tile: its scattered rows arrive while this one runs
      const Item& nx = p->items[i + 1];
      const int64_t end = p->seq_lens[nx.b] - (p->qsl[nx.b + 1] - p->qsl[nx.b]) + nx.q0 + nx.nq;
      prefetch_tile<KVT>(*p, nx.kh, nx.kh_end, p->tables + nx.b * p->W, 0, std::min<int64_t>(C, end));
    }
    const Item& it = p->items[i];
    if (!it.decode) run_item<KVT, QT>(*p, it, scratch);
    else if (p->H == 2 * L) run_decode<2, KVT, QT>(*p, it, scratch);
    else if (p->H == 4 * L) run_decode<4, KVT, QT>(*p, it, scratch);
    else run_decode<8, KVT, QT>(*p, it, scratch);
    c->done.fetch_add(1, std::memory_order_release);
  }
}

int max_threads() {
  static const int v = [] {
    const char* e = std::getenv("JAXSERVE_CPU_ATTENTION_THREADS");
    return e ? std::max(1, std::atoi(e)) : 0;  // 0: the pool's size
  }();
  return v;
}

int64_t thread_count(ffi::ThreadPool& pool) {
  const int64_t threads = pool.num_threads();
  return max_threads() ? std::min<int64_t>(threads, max_threads()) : threads;
}

template <typename KVT, typename QT>
void run_all(Problem& p, ffi::ThreadPool& pool) {
  const int64_t n = static_cast<int64_t>(p.items.size());
  auto claims = std::make_shared<Claims>(n);
  const int64_t threads = thread_count(pool);
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(threads, 1), n) - 1;
  const Problem* pp = &p;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([claims, pp] { drain<KVT, QT>(pp, claims.get()); });
  drain<KVT, QT>(pp, claims.get());
  while (claims->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                     ffi::Buffer<ffi::S32> qsl, ffi::Buffer<ffi::S32> seq_lens, ffi::Buffer<ffi::S32> tables,
                     ffi::Result<ffi::AnyBuffer> out, float sm_scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), td = tables.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2 || k.element_type() != v.element_type())
    return ffi::Error::InvalidArgument("expected q [T, N, H], k/v pages [P, S, K, H], block tables [B, W]");
  Problem p{q.untyped_data(), k.untyped_data(), v.untyped_data(), qsl.typed_data(), seq_lens.typed_data(),
            tables.typed_data(), out->untyped_data(), qd[0], qd[1], qd[2], kd[0], kd[1], kd[2], td[0], td[1],
            sm_scale, 0, {}};
  if (kd[3] != p.H || p.N % p.K || seq_lens.element_count() != p.B || qsl.element_count() != p.B + 1)
    return ffi::Error::InvalidArgument("inconsistent attention shapes");
  const auto qt = q.element_type(), kt = k.element_type();
  const bool q32 = qt == ffi::DataType::F32, k32 = kt == ffi::DataType::F32;
  const bool k16 = kt == ffi::DataType::BF16 || kt == ffi::DataType::U16;  // U16: bf16 bits
  if ((!q32 && qt != ffi::DataType::BF16) || (!k32 && !k16) || out->element_type() != qt)
    return ffi::Error::InvalidArgument("q and out must be float32 or bfloat16, k/v pages also uint16 (bf16 bits)");
  const int64_t covered = std::clamp<int64_t>(p.B ? p.qsl[p.B] : 0, 0, p.T);
  p.elem = q32 ? 4 : 2;
  std::memset(static_cast<char*>(p.out) + covered * p.N * p.H * p.elem, 0, (p.T - covered) * p.N * p.H * p.elem);
  build_items(p, std::max<int64_t>(thread_count(pool), 1));
  if (k32 && q32) run_all<float, float>(p, pool);
  else if (k32) run_all<float, uint16_t>(p, pool);
  else if (q32) run_all<uint16_t, float>(p, pool);
  else run_all<uint16_t, uint16_t>(p, pool);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveCpuRaggedPagedAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("sm_scale"));
