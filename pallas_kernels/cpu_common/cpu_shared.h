// Shared by the C++ CPU kernels (cpu_gemm, cpu_ragged_paged_attention), each one translation unit
// that includes this header: 16-lane float vectors, their horizontal reductions, and the loop that
// spreads work items over the calling thread and XLA's intra-op thread pool. cpu_ffi_build.py puts
// this directory on the include path and in every kernel's build cache key.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace {

constexpr int L = 16;  // float lanes per vector
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

inline vf splat(float x) { return vf{} + x; }

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

struct Add {
  template <typename T>
  T operator()(T a, T b) const { return a + b; }
};
struct Max {
  template <typename T>
  T operator()(T a, T b) const { return a > b ? a : b; }
};

// op over v's 16 lanes: halves combined 8, 4, then 2 + 2 lanes wide.
template <typename Op>
inline float hreduce(vf v, Op op) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  v8 a, b;
  std::memcpy(&a, &v, 32);
  std::memcpy(&b, reinterpret_cast<const char*>(&v) + 32, 32);
  a = op(a, b);
  v4 c, d;
  std::memcpy(&c, &a, 16);
  std::memcpy(&d, reinterpret_cast<const char*>(&a) + 16, 16);
  c = op(c, d);
  return op(op(c[0], c[2]), op(c[1], c[3]));
}
inline float hsum(vf v) { return hreduce(v, Add{}); }
inline float hmax(vf v) { return hreduce(v, Max{}); }

// out[i] = sum of a[i]'s lanes, for 16 vectors (a transposing reduction tree: 15 pairs of shuffles).
inline vf reduce16(vf* a) {
  const vi even = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const vi odd = even + 1;
  for (int w = L / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i)
      a[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], even) + __builtin_shuffle(a[2 * i], a[2 * i + 1], odd);
  return a[0];
}

// The positive integer in environment variable `name`, else 0 (no cap).
inline int env_thread_cap(const char* name) {
  const char* e = std::getenv(name);
  return e ? std::max(1, std::atoi(e)) : 0;
}

// Threads a kernel may use (the caller included): the pool's, at most `cap` when nonzero, at least 1.
inline int64_t pool_threads(xla::ffi::ThreadPool& pool, int cap) {
  const int64_t threads = pool.num_threads();
  return std::max<int64_t>(cap ? std::min<int64_t>(threads, cap) : threads, 1);
}

// Items [0, n) claimed one at a time, in order. `work` is a copy and `n` is read before any claim:
// a helper that starts after the call returned finds nothing left and never calls `work`, so
// `work` may point into the caller's stack.
template <typename Work>
struct Claims {
  Claims(int64_t n, const Work& work) : n(n), work(work) {}
  const int64_t n;
  const Work work;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void drain() {
    for (int64_t i; (i = next.fetch_add(1)) < n;) {
      work(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Runs work(i) for every i in [0, n) on the calling thread and min(threads, n) - 1 helpers
// scheduled on `pool`; returns when all n are done (the caller spins, yielding, on the last ones).
template <typename Work>
void run_claimed(xla::ffi::ThreadPool& pool, int64_t n, int64_t threads, const Work& work) {
  auto claims = std::make_shared<Claims<Work>>(n, work);
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(threads, 1), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([claims] { claims->drain(); });
  claims->drain();
  while (claims->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// Items [0, n) in `parts` contiguous segments, one per thread: each thread claims its own segment's
// items in order, then helps with the others' (from where each stands). work(i, next) gets the item
// this thread claims next if nobody else takes it (i + 1 within the segment, else -1), so a kernel
// can prefetch what this core reads next; with one shared counter, two threads alternate items and
// that item is usually the other thread's. The same lifetime rule as Claims: `work` is a copy and
// nothing is claimed after the counters run out.
template <typename Work>
struct Segments {
  Segments(int64_t n, int64_t parts, const Work& work) : n(n), parts(parts), work(work), next(new Counter[parts]) {
    for (int64_t p = 0; p < parts; ++p) next[p].v.store(begin(p));
  }
  struct alignas(64) Counter {
    std::atomic<int64_t> v{0};
  };
  const int64_t n, parts;
  const Work work;
  std::unique_ptr<Counter[]> next;
  std::atomic<int64_t> joined{1};  // the caller owns segment 0, helpers the rest as they start
  std::atomic<int64_t> done{0};

  int64_t begin(int64_t p) const { return p * n / parts; }
  void drain(int64_t own) {
    for (int64_t k = 0; k < parts; ++k) {
      const int64_t p = (own + k) % parts, end = begin(p + 1);
      for (int64_t i; (i = next[p].v.fetch_add(1)) < end;) {
        work(i, i + 1 < end ? i + 1 : -1);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  }
};

// run_claimed with one segment per thread (see Segments): work(i, next).
template <typename Work>
void run_segmented(xla::ffi::ThreadPool& pool, int64_t n, int64_t threads, const Work& work) {
  const int64_t parts = std::min<int64_t>(std::max<int64_t>(threads, 1), n);
  auto segs = std::make_shared<Segments<Work>>(n, parts, work);
  for (int64_t h = 1; h < parts; ++h) pool.Schedule([segs] { segs->drain(segs->joined.fetch_add(1)); });
  segs->drain(0);
  while (segs->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace
