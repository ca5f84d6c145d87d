// The prefill path (included only by kernel.cc): a block of up to kQueryBlock queries of one
// sequence and one KV head, whose KV tiles are converted to float32 once for all its rows, with an
// online softmax (run_item).
#pragma once

#include "common.h"

namespace {

// D[i, 0 : NV * L] = (D[i, ...] when Acc, else 0) + sum_k A[i * lda + k] * B[k * ldb : ... + NV * L]
// for NR rows i and k < n: NR x NV vectors in registers, one rank-1 update per k.
template <int NR, int NV, bool Acc>
inline void tile_rows(const float* A, int lda, const float* B, int ldb, int n, float* D, int ldd) {
  vf a[NR][NV];
  for (int i = 0; i < NR; ++i)
    for (int v = 0; v < NV; ++v) a[i][v] = Acc ? loadu(D + i * ldd + v * L) : vf{};
  for (int k = 0; k < n; ++k) {
    vf b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = loadu(B + k * ldb + v * L);
#pragma GCC unroll 8
    for (int i = 0; i < NR; ++i) {
      const vf x = splat(A[i * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) a[i][v] += x * b[v];
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int v = 0; v < NV; ++v) storeu(D + i * ldd + v * L, a[i][v]);
}

// S[r, :] = Q[r, :] . KT[:, :] for NR rows (KT is [Hp, C], rows of Q are Hp long).
template <int NR>
inline void qk_rows(const float* Q, const float* KT, float* S, int Hp) { tile_rows<NR, NC, false>(Q, Hp, KT, C, Hp, S, C); }

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
  tile_rows<NR, NV, true>(P, C, V + h0, Hp, n, acc + h0, Hp);
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
  for (int c = 0; c < NC; ++c) tok[c] = lane_index() + (t0 + c * L);
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

// Rows r = i * G + g of the item's queries, scaled, as float32 in s.q (zero-padded to Hp), with their positions.
template <typename QT>
void load_queries(const Problem& p, const Item& it, Scratch& s, int Hp, int64_t first_pos) {
  const int H = p.H, G = p.N / p.K;
  const int64_t qs = p.qsl[it.b];
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
}

// K and V rows of tokens t0 .. t0 + n (n <= C) of the item's KV head as float32 in s.kv / s.vv
// ([C, Hp]); the rest of both tiles is zero (stale rows must not reach the output: 0 * NaN).
template <typename KVT>
void load_kv_tile(const Problem& p, const Item& it, const int32_t* table, int64_t t0, int n, Scratch& s, int Hp) {
  const int H = p.H, S = p.S, K = p.K;
  const KVT* kp = static_cast<const KVT*>(p.k);
  const KVT* vp = static_cast<const KVT*>(p.v);
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
  if (n < C) {
    std::fill(s.kv.begin() + n * Hp, s.kv.end(), 0.0f);
    std::fill(s.vv.begin() + n * Hp, s.vv.end(), 0.0f);
  }
}

// s.s[r, :] = the R rows' scores against the tile in s.kv: per-token dot products for few rows,
// else through the transposed tile (s.kt) in 8-row register blocks.
inline void score_tile(Scratch& s, int R, int Hp, int n) {
  if (R <= kDotRows) {
    for (int j0 = 0; j0 < n; j0 += L) qk_dots(s.q.data(), R, s.kv.data() + j0 * Hp, s.s.data() + j0, Hp);
    return;
  }
  for (int j = 0; j < C; ++j)
    for (int h = 0; h < Hp; ++h) s.kt[h * C + j] = s.kv[j * Hp + h];
  int r = 0;
  for (; r + 8 <= R; r += 8) qk_rows<8>(s.q.data() + r * Hp, s.kt.data(), s.s.data() + r * C, Hp);
  for (; r < R; ++r) qk_rows<1>(s.q.data() + r * Hp, s.kt.data(), s.s.data() + r * C, Hp);
}

// s.acc[r, :] += s.s[r, :n] . s.vv[:n, :] for the R rows, 4 at a time.
inline void accumulate_tile(Scratch& s, int R, int Hp, int n) {
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

// The item's output rows: s.acc normalized by the softmax sums, converted to QT.
template <typename QT>
void store_rows(const Problem& p, const Item& it, Scratch& s, int Hp) {
  const int H = p.H, G = p.N / p.K;
  const int64_t qs = p.qsl[it.b];
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

template <typename KVT, typename QT>
void run_item(const Problem& p, const Item& it, Scratch& s) {
  const int Hp = (p.H + L - 1) / L * L;
  const int R = it.nq * (p.N / p.K);
  const int64_t first_pos = p.seq_lens[it.b] - (p.qsl[it.b + 1] - p.qsl[it.b]) + it.q0;
  const int64_t kv_end = first_pos + it.nq;  // the block's last query's position + 1
  s.q.assign(static_cast<size_t>(R) * Hp, 0.0f);
  s.acc.assign(static_cast<size_t>(R) * Hp, 0.0f);
  s.m.assign(R, -std::numeric_limits<float>::infinity());
  s.l.assign(R, 0.0f);
  s.pos.resize(R);
  s.s.resize(static_cast<size_t>(R) * C);
  s.kt.resize(static_cast<size_t>(Hp) * C);
  s.kv.resize(static_cast<size_t>(C) * Hp);  // rows past a tile's tokens are zeroed by load_kv_tile
  s.vv.resize(static_cast<size_t>(C) * Hp);
  load_queries<QT>(p, it, s, Hp, first_pos);
  const int32_t* table = p.tables + it.b * p.W;
  for (int64_t t0 = 0; t0 < kv_end; t0 += C) {
    const int n = static_cast<int>(std::min<int64_t>(C, kv_end - t0));
    prefetch_tile<KVT>(p, it.kh, it.kh + 1, table, t0 + C, std::min<int64_t>(t0 + 2 * C, kv_end));
    load_kv_tile<KVT>(p, it, table, t0, n, s, Hp);
    score_tile(s, R, Hp, n);
    softmax_tile(s, R, Hp, static_cast<int>(t0));
    accumulate_tile(s, R, Hp, n);
  }
  store_rows<QT>(p, it, s, Hp);
}

}  // namespace
