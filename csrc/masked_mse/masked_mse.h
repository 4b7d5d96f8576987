// Masked per-sample MSE over packed [B, L, D] tensors:
//   loss = mean_b( sum_{l in [s_b, e_b), d} (pred - target)^2 / ((e_b - s_b) * D) )
// and its gradient. This header holds the arithmetic and the work split both
// kernels use: each sample's range of s_b*D .. e_b*D elements (contiguous in
// the packed layout) is cut into chunks of kChunk elements; chunk c of sample b
// yields one partial sum; partials are added in chunk order, samples in order,
// so the result does not depend on thread counts or the device's scheduling.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "../common.h"

namespace opensora_fast {
namespace masked_mse {

constexpr int64_t kChunk = 16384;  // elements per partial sum
constexpr int kThreads = 256;
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block_sum: whole warps, at most 1024 threads");
static_assert(kThreads / 32 <= 32, "block_sum: one warp adds the warp sums");

// fp32 accumulation for fp32/bf16/fp16 inputs; fp64 inputs keep fp64 (gradcheck).
template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// acc + (p - t)^2 with one rounding for the square-and-add (an explicit fma,
// which nvcc would otherwise choose on its own and the CPU would not).
template <typename T>
OSF_INLINE acc_t<T> add_sq(acc_t<T> acc, T p, T t) {
  const acc_t<T> d = static_cast<acc_t<T>>(p) - static_cast<acc_t<T>>(t);
  return fma_rn(d, d, acc);
}

// d loss / d pred for one element: 2 * (pred - target) * scale, where
// scale = grad_output / (count_b * B), rounded once to pred's dtype.
template <typename T>
OSF_INLINE T grad_elem(T p, T t, acc_t<T> scale) {
  const acc_t<T> d = static_cast<acc_t<T>>(p) - static_cast<acc_t<T>>(t);
  return round_to<T>(d * (2 * scale));
}

// Token range of sample b, clamped to [0, L] with start <= end, so bad ranges
// passed straight to the op can never index outside the tensors.
struct Range {
  int64_t start, end;  // tokens
};

OSF_INLINE Range clamp_range(int64_t s, int64_t e, int64_t L) {
  s = s < 0 ? 0 : (s > L ? L : s);
  e = e < s ? s : (e > L ? L : e);
  return Range{s, e};
}

// grad_output / (count_b * B) for sample range r; 0 for an empty range. Shared
// so the CPU backward and the GPU gradient kernel scale identically.
template <typename A>
OSF_INLINE A grad_scale(A g, Range r, int64_t D, int64_t B) {
  return r.end > r.start ? g / (static_cast<A>((r.end - r.start) * D) * static_cast<A>(B)) : A(0);
}

// Elements [lo, hi) of chunk c within sample b's range, as offsets from the
// sample's first element; empty (lo == hi) when c is past the range.
OSF_INLINE void chunk_bounds(Range r, int64_t D, int64_t c, int64_t* lo, int64_t* hi) {
  const int64_t first = r.start * D, last = r.end * D;
  int64_t a = first + c * kChunk;
  int64_t b = a + kChunk;
  a = a < last ? a : last;
  b = b < last ? b : last;
  *lo = a;
  *hi = b;
}

// Number of chunks a sample of L tokens can need (the grid's chunk dimension).
OSF_INLINE int64_t max_chunks(int64_t L, int64_t D) {
  return ceil_div<int64_t>(L * D, kChunk) > 0 ? ceil_div<int64_t>(L * D, kChunk) : 1;
}

// GPU partial-sum kernel, per thread: the block for (chunk c, sample b) cuts
// its chunk into groups of V consecutive elements; group g belongs to thread
// g % kThreads, which adds its groups in order, element by element. The
// assignment depends only on element indices, never on where the tensors sit
// in memory: aligned chunks load each group as one 16-byte vector, others
// element by element, with the same sums. The block then adds the kThreads
// values with a fixed tree (masked_mse_cuda.cu: block_sum; the CPU grid walk
// emulates it).
template <typename T>
OSF_HOST_DEVICE inline acc_t<T> partial_thread_sum(const T* p, const T* t, const int64_t* ranges, int64_t L, int64_t D,
                                                   int64_t b, int64_t c, int thread) {
  using A = acc_t<T>;
  constexpr int V = 16 / sizeof(T);
  int64_t lo, hi;
  chunk_bounds(clamp_range(ranges[2 * b], ranges[2 * b + 1], L), D, c, &lo, &hi);
  const T* pb = p + b * L * D + lo;
  const T* tb = t + b * L * D + lo;
  const int64_t n = hi - lo, full = n / V;
  const bool aligned = reinterpret_cast<uintptr_t>(pb) % 16 == 0 && reinterpret_cast<uintptr_t>(tb) % 16 == 0;
  A acc = 0;
  for (int64_t g = thread; g < full; g += kThreads) {
    if (aligned) {
      const VecN<T, V> pv = reinterpret_cast<const VecN<T, V>*>(pb)[g];
      const VecN<T, V> tv = reinterpret_cast<const VecN<T, V>*>(tb)[g];
      OSF_UNROLL
      for (int k = 0; k < V; ++k)
        acc = add_sq(acc, pv.v[k], tv.v[k]);
    } else {
      OSF_UNROLL
      for (int k = 0; k < V; ++k)
        acc = add_sq(acc, pb[g * V + k], tb[g * V + k]);
    }
  }
  // The last, partial group belongs to thread full % kThreads, after its others.
  if (full % kThreads == thread)
    for (int64_t i = full * V; i < n; ++i)
      acc = add_sq(acc, pb[i], tb[i]);
  return acc;
}

// GPU gradient kernel, per thread: a block's work item (chunk c, sample b)
// covers elements [c*kChunk, (c+1)*kChunk) of the sample, zeros outside the
// range. A chunk wholly outside the range only stores zeros (no loads); one
// wholly inside computes without a compare; only the (at most two) chunks the
// range's ends cut compare per element. Groups of V consecutive elements go to
// thread g % kThreads as 16-byte vectors where all three pointers are aligned,
// element by element otherwise; each element's value is the same either way.
// grad is the 0-dim incoming gradient, read on the device (no host sync).
template <typename T>
OSF_HOST_DEVICE inline void grad_thread(const acc_t<T>* grad, const T* p, const T* t, const int64_t* ranges, T* gp,
                                        int64_t B, int64_t L, int64_t D, int64_t b, int64_t c, int thread) {
  using A = acc_t<T>;
  using Vec = VecN<T, 16 / sizeof(T)>;
  constexpr int V = 16 / sizeof(T);
  const Range r = clamp_range(ranges[2 * b], ranges[2 * b + 1], L);
  const int64_t a0 = c * kChunk, a1 = (a0 + kChunk < L * D) ? a0 + kChunk : L * D;
  const int64_t lo = r.start * D, hi = r.end * D;
  const int64_t off = b * L * D + a0, n = a1 - a0, full = n / V;
  T* gc = gp + off;
  const bool g_aligned = reinterpret_cast<uintptr_t>(gc) % 16 == 0;
  if (hi <= a0 || a1 <= lo) {  // wholly outside the range
    Vec z;
    OSF_UNROLL
    for (int k = 0; k < V; ++k)
      z.v[k] = T(0);
    for (int64_t g = thread; g < full; g += kThreads) {
      if (g_aligned) {
        reinterpret_cast<Vec*>(gc)[g] = z;
      } else {
        OSF_UNROLL
        for (int k = 0; k < V; ++k)
          gc[g * V + k] = T(0);
      }
    }
    for (int64_t i = full * V + thread; i < n; i += kThreads)
      gc[i] = T(0);
    return;
  }
  const A scale = grad_scale(*grad, r, D, B);
  const T* pc = p + off;
  const T* tc = t + off;
  if (lo <= a0 && a1 <= hi) {  // wholly inside
    const bool aligned =
        g_aligned && reinterpret_cast<uintptr_t>(pc) % 16 == 0 && reinterpret_cast<uintptr_t>(tc) % 16 == 0;
    for (int64_t g = thread; g < full; g += kThreads) {
      if (aligned) {
        const Vec pv = reinterpret_cast<const Vec*>(pc)[g];
        const Vec tv = reinterpret_cast<const Vec*>(tc)[g];
        Vec out;
        OSF_UNROLL
        for (int k = 0; k < V; ++k)
          out.v[k] = grad_elem(pv.v[k], tv.v[k], scale);
        reinterpret_cast<Vec*>(gc)[g] = out;
      } else {
        OSF_UNROLL
        for (int k = 0; k < V; ++k)
          gc[g * V + k] = grad_elem(pc[g * V + k], tc[g * V + k], scale);
      }
    }
    for (int64_t i = full * V + thread; i < n; i += kThreads)
      gc[i] = grad_elem(pc[i], tc[i], scale);
    return;
  }
  for (int64_t i = thread; i < n; i += kThreads)  // cut by a range end
    gc[i] = (a0 + i >= lo && a0 + i < hi) ? grad_elem(pc[i], tc[i], scale) : T(0);
}

// Final step, shared: partials [B, C] -> per-sample means -> their mean over B,
// always in this order. A sample with an empty range gives 0/0 = NaN, as
// upstream's mean over an empty slice does.
template <typename A>
OSF_HOST_DEVICE inline A sample_mean(const A* partial, const int64_t* ranges, int64_t b, int64_t C, int64_t L,
                                     int64_t D) {
  A s = 0;
  for (int64_t c = 0; c < C; ++c)
    s += partial[b * C + c];
  const Range r = clamp_range(ranges[2 * b], ranges[2 * b + 1], L);
  return s / static_cast<A>((r.end - r.start) * D);
}

template <typename A>
OSF_HOST_DEVICE inline A batch_mean(const A* sample_means, int64_t B) {
  A total = 0;
  for (int64_t b = 0; b < B; ++b)
    total += sample_means[b];
  return round_to<A>(total / static_cast<A>(B));
}

// loss_ranges, per sample: which frames of a [B, T] frame mask stay in the loss,
// as a token range [start*hw, end*hw). A frame is conditioned when its mask
// value == 1 (NaN is not). upstream rule: frame 0 (and, alike, frame T-1) is
// dropped when conditioned and no interior frame is; otherwise the leading and
// trailing runs of conditioned frames are dropped. end >= start always.
template <typename M>
OSF_HOST_DEVICE inline bool conditioned(M v) {
  return static_cast<double>(v) == 1.0;
}

template <typename M>
OSF_HOST_DEVICE inline void frame_range(const M* m, int64_t stride, int64_t T, int64_t hw, bool upstream,
                                        int64_t* out) {
  int64_t start, end;
  if (upstream) {
    bool interior = false;
    for (int64_t t = 1; t + 1 < T; ++t)
      interior = interior || conditioned(m[t * stride]);
    start = (!interior && conditioned(m[0])) ? 1 : 0;
    end = T - ((!interior && conditioned(m[(T - 1) * stride])) ? 1 : 0);
  } else {
    start = 0;
    while (start < T && conditioned(m[start * stride]))
      ++start;
    int64_t tail = 0;
    while (tail < T && conditioned(m[(T - 1 - tail) * stride]))
      ++tail;
    end = T - tail;
  }
  out[0] = start * hw;
  out[1] = (end > start ? end : start) * hw;
}

}  // namespace masked_mse
}  // namespace opensora_fast
