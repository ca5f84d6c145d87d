// The decode path (included only by kernel.cc): one query per sequence over its KV heads, K and V
// rows read in place from their pages (run_decode).
#pragma once

#include "common.h"

namespace {

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
      vf kt[L][NH];  // the tile's K rows of this head, converted once for its G query rows
#pragma GCC unroll 16
      for (int j = 0; j < L; ++j) {
        const KVT* kr = kp + off[t0 + std::min<int64_t>(j, last)] + kh * NH * L;
        for (int h = 0; h < NH; ++h) kt[j][h] = load(kr + h * L);
      }
      for (int g = 0; g < G; ++g) {
        const int r = kh * G + g;
        vf qv[NH], a[L];
        for (int h = 0; h < NH; ++h) qv[h] = loadu(q + r * NH * L + h * L);
#pragma GCC unroll 16
        for (int j = 0; j < L; ++j) {
          vf acc = qv[0] * kt[j][0];
          for (int h = 1; h < NH; ++h) acc += qv[h] * kt[j][h];
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
// across the item's heads; asks for V's rows kAhead tokens on and, past n, for the next decode
// item's first K rows (next_n rows at next_off, next_bytes each; next_n = 0: none).
template <int NH, typename KVT>
void decode_pv(const KVT* vp, const int64_t* off, int64_t n, const float* P, int G, int nkh, float* acc,
               int64_t Tp, const KVT* kp, const int64_t* next_off, int64_t next_n, int64_t next_bytes) {
  constexpr int RB = NH >= 8 ? 2 : 4;  // rows per pass: RB * NH accumulators in registers
  const int64_t bytes = nkh * NH * L * static_cast<int64_t>(sizeof(KVT));
  for (int64_t t0 = 0; t0 < n; t0 += C) {
    const int64_t t1 = std::min<int64_t>(t0 + C, n);
    const int64_t a = t0 + kAhead, b = a + C;  // past n: the next item's first K rows
    prefetch_rows(vp, off, std::min(a, n), std::min(b, n), bytes);
    prefetch_rows(kp, next_off, std::clamp<int64_t>(a - n, 0, next_n), std::clamp<int64_t>(b - n, 0, next_n),
                  next_bytes);
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
  const vi lane = lane_index();
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

// Offsets of the first `count` tokens' rows of item it's KV heads in the pages (row units).
inline void decode_offsets(const Problem& p, const Item& it, int64_t count, std::vector<int64_t>& off) {
  const int32_t* table = p.tables + it.b * p.W;
  off.resize(count);
  for (int64_t t = 0; t < count; ++t) {
    const int64_t page = std::min<int64_t>(std::max<int32_t>(table[t / p.S], 0), p.P - 1);
    off[t] = ((page * p.S + t % p.S) * p.K + it.kh) * p.H;
  }
}

// The one query of sequence it.b (at position seq_len - 1: every token is visible), KV heads
// [it.kh, it.kh_end): scores over all K rows, softmax, then P.V over all V rows, each row read in
// place from its page (bf16 converted in registers); `next` (or null): the decode item likely run
// after it, whose first K rows are asked for while this one's V rows are read. H = NH * L.
template <int NH, typename KVT, typename QT>
void run_decode(const Problem& p, const Item& it, const Item* next, Scratch& s) {
  constexpr int H = NH * L;
  const int G = p.N / p.K, nkh = it.kh_end - it.kh, R = nkh * G;
  const int64_t n = p.seq_lens[it.b], Tp = (n + L - 1) / L * L, qi = p.qsl[it.b];
  decode_offsets(p, it, n, s.off);
  const int64_t next_n = next ? std::min<int64_t>(p.seq_lens[next->b], kAhead) : 0;
  decode_offsets(p, next ? *next : it, next_n, s.next_off);
  s.q.resize(static_cast<size_t>(R) * H);
  const QT* q = static_cast<const QT*>(p.q) + (qi * p.N + it.kh * G) * H;
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < NH; ++h) storeu(s.q.data() + r * H + h * L, load(q + r * H + h * L) * p.scale);
  s.s.resize(static_cast<size_t>(R) * Tp);
  s.l.resize(R);
  s.acc.assign(static_cast<size_t>(R) * H, 0.0f);
  const KVT* kp = static_cast<const KVT*>(p.k);
  const KVT* vp = static_cast<const KVT*>(p.v);
  const int64_t next_bytes = next ? (next->kh_end - next->kh) * H * static_cast<int64_t>(sizeof(KVT)) : 0;
  decode_scores<NH>(kp, vp, s.off.data(), n, s.q.data(), G, nkh, s.s.data(), Tp);
  decode_softmax(s.s.data(), R, n, Tp, s.l.data());
  decode_pv<NH>(vp, s.off.data(), n, s.s.data(), G, nkh, s.acc.data(), Tp, kp, s.next_off.data(), next_n, next_bytes);
  QT* out = static_cast<QT*>(p.out) + (qi * p.N + it.kh * G) * H;
  for (int r = 0; r < R; ++r) {
    float* a = s.acc.data() + r * H;
    for (int h = 0; h < NH; ++h) storeu(a + h * L, loadu(a + h * L) * s.l[r]);
    from_f32(a, out + r * H, H);
  }
}

}  // namespace
