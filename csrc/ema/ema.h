// Fused multi-tensor EMA: ema[i] = ema[i] * decay + src[i] * (1 - decay).
//
// This header is the single source of the arithmetic and of the GPU launch
// geometry. The CPU kernel and the CUDA kernel both call ema_compat /
// ema_stochastic, and the CUDA kernel's per-thread body (Body, over the shared
// launch core) is a plain host/device function of (block, thread) so a CPU
// test can walk the whole grid (op _ema_update_grid_walk_) and compare with
// the reference.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common.h"
#include "../multi_tensor.h"

namespace opensora_fast {
namespace ema {

template <typename T>
struct is_reduced
    : std::integral_constant<bool, std::is_same<T, c10::BFloat16>::value || std::is_same<T, c10::Half>::value> {};

// alpha = 1 - decay as torch's `ema.add_(src, alpha=1 - decay)` sees it: the
// Python double rounded to fp32, and, when ema and src share a reduced dtype
// (bf16/bf16, fp16/fp16), rounded once more to that dtype, because torch's CPU
// add then works in that dtype's "scalar_t" for alpha (measured on torch 2.14 CPU).
template <typename E, typename S>
inline float compat_alpha(double decay) {
  float a = static_cast<float>(1.0 - decay);
  if (std::is_same<E, S>::value && is_reduced<E>::value)
    a = static_cast<float>(E(a));
  return a;
}

// Upstream's two-op update, rounding for rounding:
//   mul_:  e1 = E(e * d)              (fp32 product, rounded to E)
//   add_:  r  = E(fma(s, alpha, e1))  (fp32 fused multiply-add, rounded to E)
// For a bf16 EMA that is bf16(bf16(e*d) + (1-d)*s). This is torch's CPU rule
// for every pair; for bf16/bf16 and fp16/fp16 only on its vectorised body:
// the scalar remainder of each torch thread chunk (< 2 vectors) computes
// E(e1 + E(alpha*s)): one more rounding, of alpha*s (tests/test_properties.py bounds it).
// The CUDA kernel runs this same function, so CPU and GPU agree bit for bit;
// torch's own CUDA add does not round alpha for bf16/bf16 and fp16/fp16, so
// there it and we differ by that rounding of alpha*s (identical for mixed or fp32 pairs).
template <typename E, typename S>
OSF_INLINE E ema_compat(E e, S s, float decay, float alpha) {
  const E e1 = static_cast<E>(mul_rn(static_cast<float>(e), decay));
  return round_to<E>(fma_rn(static_cast<float>(s), alpha, static_cast<float>(e1)));
}

// Stochastic rounding of an fp32 value to E: rounds to one of the two
// neighbours of r in E with probability proportional to proximity, so the
// expected value is r. That keeps a bf16 EMA moving at decay 0.9999, where
// the increment is far below half an ulp and round-to-nearest discards it.
template <typename E>
OSF_INLINE uint16_t nearest_bits(float r) {
  if constexpr (std::is_same<E, c10::BFloat16>::value) {
    // bf16 round-to-nearest-even on the bits (NaN handled by the caller), so
    // the whole of round_stochastic is selects and the CPU loop vectorises.
    const uint32_t b = f32_bits(r);
    return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
  } else {
    return static_cast<E>(r).x;
  }
}

template <typename E>
OSF_INLINE float widen_bits(uint16_t bits) {
  if constexpr (std::is_same<E, c10::BFloat16>::value) {
    return f32_from_bits(static_cast<uint32_t>(bits) << 16);
  } else {
    return static_cast<float>(E(bits, E::from_bits()));
  }
}

template <typename E>
OSF_INLINE E round_stochastic(float r, float u) {
  if constexpr (!is_reduced<E>::value) {
    return round_to<E>(r);
  } else {
    // t: the neighbour of r towards zero; h: the next one away from zero. Both
    // formats are sign-magnitude, so +-1 on the bits steps the magnitude. No
    // early exits: exact r gives p = 0 (t = r); overflow gives h = inf, p = 0;
    // inf gives h = NaN, p = NaN, so t = inf; NaN is selected at the end.
    const uint16_t nb = nearest_bits<E>(r);
    const uint16_t tb = fabsf(widen_bits<E>(nb)) > fabsf(r) ? static_cast<uint16_t>(nb - 1) : nb;
    const uint16_t hb = static_cast<uint16_t>(tb + 1);
    const float lo = fabsf(widen_bits<E>(tb));
    const float hi = fabsf(widen_bits<E>(hb));
    const float p = (fabsf(r) - lo) / (hi - lo);
    const uint16_t out = u < p ? hb : tb;
    return r != r ? round_to<E>(r) : E(out, E::from_bits());
  }
}

// EMA in fp32 with one stochastic rounding at the end; `index` is the element's
// position in the whole call (pairs laid end to end), so results depend only
// on (seed, data), never on threads or launch geometry.
template <typename E, typename S>
OSF_INLINE E ema_stochastic(E e, S s, float decay, float alpha, uint64_t seed, uint64_t index) {
  const float r = fma_rn(static_cast<float>(s), alpha, mul_rn(static_cast<float>(e), decay));
  return round_stochastic<E>(r, uniform01(seed, index));
}

struct Params {
  float decay;
  float alpha;
  uint64_t seed;
  bool stochastic;
};

template <typename E, typename S>
inline Params make_params(double decay, bool stochastic, int64_t seed) {
  // Stochastic mode rounds once, from fp32, so it takes the plain fp32 alpha.
  const float alpha = stochastic ? static_cast<float>(1.0 - decay) : compat_alpha<E, S>(decay);
  return Params{static_cast<float>(decay), alpha, static_cast<uint64_t>(seed), stochastic};
}

// Calls f(Tag<E>{}, Tag<S>{}) for the (ema, src) dtype pair; the op accepts
// fp32, bf16 and fp16 on either side (check_inputs rejected the rest).
template <typename F>
inline void dispatch_pair(c10::ScalarType e, c10::ScalarType s, F&& f) {
  dispatch_float_pair<false>(e, s, "ema_update_", "ema", "src", std::forward<F>(f));
}

template <typename E, typename S>
OSF_INLINE E ema_one(E e, S s, const Params& p, uint64_t index) {
  return p.stochastic ? ema_stochastic(e, s, p.decay, p.alpha, p.seed, index) : ema_compat(e, s, p.decay, p.alpha);
}

// The scalar update with the rounding mode fixed at compile time (the CUDA
// kernel is instantiated per mode: no per-element branch).
template <typename E, typename S, bool Stochastic>
OSF_INLINE E ema_step(E e, S s, const Params& p, uint64_t index) {
  if constexpr (Stochastic)
    return ema_stochastic(e, s, p.decay, p.alpha, p.seed, index);
  else
    return ema_compat(e, s, p.decay, p.alpha);
}

// ---------------------------------------------------------------------------
// GPU schedule over the launch core's strided tables (multi_tensor.h): a
// persistent grid (SMs x resident blocks) whose blocks stride over work units
// of kUnit elements. A tensor of more than kPackMax elements takes
// ceil(numel / kUnit) units; the smaller ones are packed, up to kMaxPack
// tensors and kUnit elements together, into one unit that a block walks tensor
// after tensor. A table is one launch: the 1082-tensor shard list of the 11B
// model takes two big tables (or 13 small ones) at any world size.
constexpr int64_t kUnit = 16384;  // a multiple of every vector width
constexpr int64_t kPackMax = 4096;
constexpr int kMaxPack = 32;
constexpr int kThreads = 512;
constexpr int kMinBlocks = 4;  // __launch_bounds__: 4 x 512 threads (32 registers) fill an SM
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "kThreads: whole warps, at most 1024");
static_assert(kPackMax <= kUnit && kUnit <= INT32_MAX, "a packed tensor fits one unit; 32-bit unit offsets");

// One (ema, src) pair of a launch.
struct Entry {
  void* ema;
  const void* src;
  int64_t numel;
  int64_t index_base;  // global element index of element 0
  int32_t pack;        // entries a unit of this one covers: 1 (itself), k > 1 (it and k - 1 riders), 0 (a rider)
};

using Args = Params;
using BigTable = StridedTable<Entry, 720>;
using SmallTable = StridedTable<Entry, 88>;
static_assert(kernel_arg_bytes<BigTable, Args>() <= kBigArgBytes, "kernel arguments over 32 KiB");
static_assert(kernel_arg_bytes<SmallTable, Args>() <= kSmallArgBytes, "kernel arguments over 4 KiB");

// Units of a scheduled entry: 0 for a rider, 1 for a pack.
inline int64_t units_of(const Entry& e) {
  return e.pack == 0 ? 0 : e.pack > 1 ? 1 : ceil_div<int64_t>(e.numel, kUnit);
}

// The strided tables of one dtype group: the large tensors first, in call
// order, then the small ones (numel <= kPackMax) packed in call order. Order
// changes no result (index_base travels with each entry). max_entries: 0 or a
// smaller table limit (tests), which also caps the pack length.
template <typename Table>
inline std::vector<Table> plan(const std::vector<Entry>& entries, int64_t max_entries = 0) {
  const int64_t cap = (max_entries > 0 && max_entries < Table::kMaxEntries) ? max_entries : Table::kMaxEntries;
  const int64_t max_pack = cap < kMaxPack ? cap : kMaxPack;
  std::vector<Entry> order;
  order.reserve(entries.size());
  for (const Entry& e : entries)
    if (e.numel > kPackMax) {
      order.push_back(e);
      order.back().pack = 1;
    }
  size_t lead = 0;  // the open pack's first entry
  int64_t filled = kUnit;
  for (const Entry& e : entries) {
    if (e.numel > kPackMax)
      continue;
    order.push_back(e);
    if (filled + e.numel <= kUnit && order[lead].pack < max_pack) {
      ++order[lead].pack;
      order.back().pack = 0;
      filled += e.numel;
    } else {
      lead = order.size() - 1;
      order.back().pack = 1;
      filled = e.numel;
    }
  }
  return plan_strided<Table>(order, [&](size_t i) { return units_of(order[i]); }, cap);
}

// Vector width: 16-byte accesses for the wider of the two element types (a
// bf16 ema with an fp32 src loads 8 bytes of ema, 16 of src).
template <typename E, typename S>
constexpr int vec_width() {
  return 16 / (sizeof(E) > sizeof(S) ? sizeof(E) : sizeof(S));
}

// Vectors per thread loaded before the first store.
constexpr int kInFlight = 2;

// Resident blocks per SM the kernel's registers must allow (its
// __launch_bounds__): the most of 4 (32 registers), 3 (40) and 2 (64) at which
// nvcc 13 -Xptxas -v reports no spills on sm_80 and sm_90 (docs/ops/ema.md).
template <typename E, typename S, bool Stochastic>
constexpr int min_blocks() {
  if constexpr (!is_reduced<E>::value)
    return kMinBlocks;
  else if constexpr (Stochastic)
    return 2;
  else if constexpr (std::is_same<E, c10::BFloat16>::value && !std::is_same<S, c10::Half>::value)
    return kMinBlocks;
  else if constexpr (std::is_same<E, c10::Half>::value && std::is_same<S, float>::value)
    return 2;
  else
    return 3;
}

// What thread `thread` of block `block` of a grid of `grid` blocks does
// (nthreads = blockDim.x). The math is elementwise, so the access width
// (vectors where both pointers can be aligned, single elements otherwise) and
// the order never change a result, and the random stream of the stochastic
// mode is a function of (seed, global element index) only.
template <typename E, typename S, bool Stochastic>
struct Body {
  // Elements [lo, lo + n) of one pair; 32-bit offsets within the unit.
  static OSF_INLINE void unit(const Entry& en, int64_t lo, int32_t n, const Params& p, int thread, int nthreads) {
    constexpr int V = vec_width<E, S>();
    using EV = VecN<E, V>;
    using SV = VecN<S, V>;
    E* __restrict__ e = static_cast<E*>(en.ema) + lo;
    const S* __restrict__ s = static_cast<const S*>(en.src) + lo;
    const uint64_t base = static_cast<uint64_t>(en.index_base + lo);
    // Vectors start where both pointers are aligned: after `head` single
    // elements when both sit equally far (in elements) past a vector boundary
    // (lo is a multiple of V, so every unit of a tensor agrees); else none.
    const uintptr_t ea = reinterpret_cast<uintptr_t>(e), sa = reinterpret_cast<uintptr_t>(s);
    const int32_t eo = static_cast<int32_t>((ea / sizeof(E)) % V);
    const bool vec = ea % sizeof(E) == 0 && sa % sizeof(S) == 0 && eo == static_cast<int32_t>((sa / sizeof(S)) % V);
    const int32_t head = vec ? ((V - eo) % V < n ? (V - eo) % V : n) : n;
    const int32_t nvec = (n - head) / V;
    EV* __restrict__ ev = reinterpret_cast<EV*>(e + head);
    const SV* __restrict__ sv = reinterpret_cast<const SV*>(s + head);
    int32_t v = thread;
    for (; v + (kInFlight - 1) * nthreads < nvec; v += kInFlight * nthreads) {
      EV a[kInFlight];
      SV b[kInFlight];
      OSF_UNROLL
      for (int j = 0; j < kInFlight; ++j) {
        a[j] = ev[v + j * nthreads];
        b[j] = sv[v + j * nthreads];
      }
      OSF_UNROLL
      for (int j = 0; j < kInFlight; ++j) {
        const int32_t at = head + (v + j * nthreads) * V;
        OSF_UNROLL
        for (int k = 0; k < V; ++k)
          a[j].v[k] = ema_step<E, S, Stochastic>(a[j].v[k], b[j].v[k], p, base + static_cast<uint32_t>(at + k));
        ev[v + j * nthreads] = a[j];
      }
    }
    for (; v < nvec; v += nthreads) {
      EV a = ev[v];
      const SV b = sv[v];
      const int32_t at = head + v * V;
      OSF_UNROLL
      for (int k = 0; k < V; ++k)
        a.v[k] = ema_step<E, S, Stochastic>(a.v[k], b.v[k], p, base + static_cast<uint32_t>(at + k));
      ev[v] = a;
    }
    // The single elements: the head, then the tail after the last vector.
    const int32_t tail = head + nvec * V;
    for (int32_t i = thread; i < head + (n - tail); i += nthreads) {
      const int32_t at = i < head ? i : tail + (i - head);
      e[at] = ema_step<E, S, Stochastic>(e[at], s[at], p, base + static_cast<uint32_t>(at));
    }
  }

  template <typename Table>
  static OSF_HOST_DEVICE void run(const Table& tab, const Params& p, int block, int grid, int thread, int nthreads) {
    for (int64_t u = block; u < tab.n_units; u += grid) {
      const int i = strided_entry(tab, static_cast<int32_t>(u));
      const int64_t lo = (u - tab.first_unit[i]) * kUnit;  // 0 for a pack
      const int pack = tab.entry[i].pack;
      for (int k = 0; k < pack; ++k) {
        const Entry& en = tab.entry[i + k];
        const int64_t left = en.numel - lo;
        unit(en, lo, static_cast<int32_t>(left < kUnit ? left : kUnit), p, thread, nthreads);
      }
    }
  }
};

}  // namespace ema
}  // namespace opensora_fast
