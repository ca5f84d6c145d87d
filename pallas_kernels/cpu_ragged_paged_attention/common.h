// Shared by the CPU attention kernel's files (included only by kernel.cc, one translation unit):
// tile constants, helpers of the 16-lane float vectors (loads and float32/bfloat16 conversions;
// the vectors, their exp and horizontal reductions are pallas_kernels/cpu_common's), the problem,
// its work items and the per-thread scratch.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_shared.h"  // pallas_kernels/cpu_common: L, vf, vi, splat, vexp, hsum, hmax, reduce16

namespace {

constexpr int C = 32;           // KV tokens per tile
constexpr int NC = C / L;       // vectors per tile row
constexpr int kQueryBlock = 16; // queries per work item (prefill)
constexpr int kDotRows = 8;     // items with at most this many rows use per-token dot products

inline vf loadu(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
static_assert(L == 16, "lane_index lists L lanes");
inline vi lane_index() { return vi{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }  // lane i holds i

inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) {
  const uint32_t u = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
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
  std::vector<int64_t> off, next_off;
};

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

}  // namespace
