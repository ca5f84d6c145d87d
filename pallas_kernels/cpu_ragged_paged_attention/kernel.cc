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

//
// Files: common.h (vectors, conversions, Problem / Item / Scratch), decode.h (run_decode),
// prefill.h (run_item), and here the work items, their dispatch to pallas_kernels/cpu_common's
// run_claimed and the FFI entry point. The headers
// are included here only: the kernel stays one translation unit.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

#include "common.h"
#include "decode.h"
#include "prefill.h"

namespace ffi = xla::ffi;

namespace {

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

// Item i (claimed by run_claimed, pallas_kernels/cpu_common) of the n in p. A decode item followed
// by another asks for that one's first K rows while it reads its own V rows (run_decode); else the
// next item's first tile is asked for before this one runs, its scattered rows arriving meanwhile.
template <typename KVT, typename QT>
void run_claimed_item(const Problem* p, int64_t i, int64_t n) {
  thread_local Scratch scratch;
  const Item& it = p->items[i];
  const Item* next = i + 1 < n ? &p->items[i + 1] : nullptr;
  if (next && !(it.decode && next->decode)) {
    const int64_t end = p->seq_lens[next->b] - (p->qsl[next->b + 1] - p->qsl[next->b]) + next->q0 + next->nq;
    prefetch_tile<KVT>(*p, next->kh, next->kh_end, p->tables + next->b * p->W, 0, std::min<int64_t>(C, end));
  }
  if (next && !next->decode) next = nullptr;
  if (!it.decode) run_item<KVT, QT>(*p, it, scratch);
  else if (p->H == 2 * L) run_decode<2, KVT, QT>(*p, it, next, scratch);
  else if (p->H == 4 * L) run_decode<4, KVT, QT>(*p, it, next, scratch);
  else run_decode<8, KVT, QT>(*p, it, next, scratch);
}

int max_threads() {
  static const int v = env_thread_cap("JAXSERVE_CPU_ATTENTION_THREADS");
  return v;
}

template <typename KVT, typename QT>
void run_all(Problem& p, ffi::ThreadPool& pool) {
  const int64_t n = static_cast<int64_t>(p.items.size());
  const Problem* pp = &p;  // read only after a claim: a helper that starts late never touches it
  run_claimed(pool, n, pool_threads(pool, max_threads()), [pp, n](int64_t i) { run_claimed_item<KVT, QT>(pp, i, n); });
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
  if (kd[3] != p.H || p.N % p.K || static_cast<int64_t>(seq_lens.element_count()) != p.B ||
      static_cast<int64_t>(qsl.element_count()) != p.B + 1)
    return ffi::Error::InvalidArgument("inconsistent attention shapes");
  const auto qt = q.element_type(), kt = k.element_type();
  const bool q32 = qt == ffi::DataType::F32, k32 = kt == ffi::DataType::F32;
  const bool k16 = kt == ffi::DataType::BF16 || kt == ffi::DataType::U16;  // U16: bf16 bits
  if ((!q32 && qt != ffi::DataType::BF16) || (!k32 && !k16) || out->element_type() != qt)
    return ffi::Error::InvalidArgument("q and out must be float32 or bfloat16, k/v pages also uint16 (bf16 bits)");
  const int64_t covered = std::clamp<int64_t>(p.B ? p.qsl[p.B] : 0, 0, p.T);
  p.elem = q32 ? 4 : 2;
  std::memset(static_cast<char*>(p.out) + covered * p.N * p.H * p.elem, 0, (p.T - covered) * p.N * p.H * p.elem);
  build_items(p, pool_threads(pool, max_threads()));
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
