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

// ---------------------------------------------------------------------------
// GPU launch geometry over the shared launch core (multi_tensor.h): each block
// owns one chunk of kChunk elements of one tensor. The big table (CUDA runtime
// and driver >= 12.1) takes the 1082-tensor shard list of the 11B model in two
// or three launches; the small one fits the classic 4 KiB.
constexpr int64_t kChunk = 32768;  // a multiple of every vector width
constexpr int kThreads = 512;
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "kThreads: whole warps, at most 1024");

// One (ema, src) pair of a launch.
struct Entry {
  void* ema;
  const void* src;
  int64_t numel;
  int64_t index_base;  // global element index of element 0
};

using Args = Params;
using BigTable = LaunchTable<Entry, 256, 2048>;
using SmallTable = LaunchTable<Entry, 36, 320>;
static_assert(kernel_arg_bytes<BigTable, Args>() <= kBigArgBytes, "kernel arguments over 32 KiB");
static_assert(kernel_arg_bytes<SmallTable, Args>() <= kSmallArgBytes, "kernel arguments over 4 KiB");

inline int64_t blocks_of(const Entry& e) {
  return ceil_div<int64_t>(e.numel, kChunk);
}

// Vector width: 16-byte accesses for the wider of the two element types.
template <typename E, typename S>
constexpr int vec_width() {
  return 16 / (sizeof(E) > sizeof(S) ? sizeof(E) : sizeof(S));
}

// What thread `thread` of block `block` does (nthreads = blockDim.x). The math
// is elementwise, so the access width (16-byte vectors when both pointers are
// aligned, single elements otherwise) never changes a result.
template <typename E, typename S>
struct Body {
  template <typename Table>
  static OSF_HOST_DEVICE void run(const Table& tab, const Params& p, int block, int /*y*/, int thread, int nthreads) {
    constexpr int V = vec_width<E, S>();
    const Entry& en = tab.entry[tab.block_entry[block]];
    const int64_t lo = static_cast<int64_t>(tab.block_chunk[block]) * kChunk;
    const int64_t n = (en.numel - lo < kChunk) ? en.numel - lo : kChunk;
    E* e = static_cast<E*>(en.ema) + lo;
    const S* s = static_cast<const S*>(en.src) + lo;
    const uint64_t base = static_cast<uint64_t>(en.index_base + lo);

    // lo is a multiple of V, so the chunk is aligned exactly when the tensor is.
    const bool aligned =
        reinterpret_cast<uintptr_t>(e) % (sizeof(E) * V) == 0 && reinterpret_cast<uintptr_t>(s) % (sizeof(S) * V) == 0;
    int64_t done = 0;
    if (aligned) {
      const int64_t nvec = n / V;
      for (int64_t v = thread; v < nvec; v += nthreads) {
        VecN<E, V> ev = reinterpret_cast<const VecN<E, V>*>(e)[v];
        const VecN<S, V> sv = reinterpret_cast<const VecN<S, V>*>(s)[v];
        OSF_UNROLL
        for (int k = 0; k < V; ++k)
          ev.v[k] = ema_one(ev.v[k], sv.v[k], p, base + v * V + k);
        reinterpret_cast<VecN<E, V>*>(e)[v] = ev;
      }
      done = nvec * V;
    }
    for (int64_t i = done + thread; i < n; i += nthreads)
      e[i] = ema_one(e[i], s[i], p, base + i);
  }
};

}  // namespace ema
}  // namespace opensora_fast
