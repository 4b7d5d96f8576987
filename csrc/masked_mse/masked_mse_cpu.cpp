// Masked MSE on the CPU, and the CPU walk over the CUDA kernels' grids.
#include <ATen/Dispatch.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full_like.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../cpu_isa.h"
#include "masked_mse.h"
#include "masked_mse_ops.h"
#include "masked_mse_simd.h"

namespace opensora_fast {
namespace masked_mse {

namespace {

// The per-thread sums of whole rounds, for the baseline build: the scalar
// core's loop, threads in turn (masked_mse_simd.h has the AVX2/AVX-512 ones).
template <typename T>
struct Rounds {
  static OSF_ALWAYS_INLINE void run(const T* p, const T* t, int64_t r, acc_t<T>* acc) {
    constexpr int V = 16 / sizeof(T);
    for (int th = 0; th < kThreads; ++th)
      acc[th] = acc_t<T>(0);
    for (int64_t g0 = 0; g0 < r * kThreads; g0 += kThreads)
      for (int th = 0; th < kThreads; ++th) {
        acc_t<T> a = acc[th];
        for (int k = 0; k < V; ++k)
          a = add_sq(a, p[(g0 + th) * V + k], t[(g0 + th) * V + k]);
        acc[th] = a;
      }
  }
};

// Whole rounds in the build of the ISA variant in use.
template <typename T>
void round_sums(const T* p, const T* t, int64_t r, acc_t<T>* acc) {
  const int isa = cpu_isa::current();
#ifdef OSF_AVX512_PATH
  // 64-byte loads that straddle cache lines run at half speed from memory
  // (Zen 5), so unaligned chunks take the 32-byte build: the same bits.
  const bool aligned = reinterpret_cast<uintptr_t>(p) % 64 == 0 && reinterpret_cast<uintptr_t>(t) % 64 == 0;
  if (isa == cpu_isa::kAvx512 && aligned)
    return simd::avx512::rounds(p, t, r, acc);
#endif
#ifdef OSF_AVX2_PATH
  if (isa >= cpu_isa::kAvx2)
    return simd::avx2::rounds(p, t, r, acc);
#endif
  (void)isa;
  cpu_isa::baseline<Rounds<T>>(p, t, r, acc);
}

// partial_thread_sum for every thread of the block over chunk elements [0, n):
// whole rounds of kThreads groups vectorised (lanes are GPU threads), the
// last partial round and the last partial group as the scalar core does them.
template <typename T>
void thread_sums(const T* p, const T* t, int64_t n, acc_t<T>* acc) {
  constexpr int V = 16 / sizeof(T);
  const int64_t full = n / V, r = full / kThreads;
  round_sums(p, t, r, acc);
  for (int64_t g = r * kThreads; g < full; ++g)
    for (int k = 0; k < V; ++k)
      acc[g % kThreads] = add_sq(acc[g % kThreads], p[g * V + k], t[g * V + k]);
  for (int64_t i = full * V; i < n; ++i)
    acc[full % kThreads] = add_sq(acc[full % kThreads], p[i], t[i]);
}

// masked_mse_cuda.cu's block_sum as it reaches thread 0: each warp's
// __shfl_down_sync tree, then the same tree over the warp sums padded with zeros.
template <typename A>
A block_sum(A* v) {
  A w[32];
  for (int warp = 0; warp < kThreads / 32; ++warp) {
    A* x = v + 32 * warp;
    for (int o = 16; o > 0; o /= 2)
      for (int lane = 0; lane < o; ++lane)
        x[lane] += x[lane + o];
    w[warp] = x[0];
  }
  for (int lane = kThreads / 32; lane < 32; ++lane)
    w[lane] = A(0);
  for (int o = 16; o > 0; o /= 2)
    for (int lane = 0; lane < o; ++lane)
      w[lane] += w[lane + o];
  return w[0];
}

template <typename T>
struct Grad {
  static OSF_ALWAYS_INLINE void run(const T* p, const T* t, T* g, int64_t n, acc_t<T> scale) {
    for (int64_t i = 0; i < n; ++i)
      g[i] = grad_elem(p[i], t[i], scale);
  }
};

at::Tensor forward_cpu(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& ranges) {
  check_inputs(pred, target, ranges);
  const int64_t B = pred.size(0), L = pred.size(1), D = pred.size(2), C = max_chunks(L, D);
  at::Tensor loss = at::empty({}, pred.options().dtype(acc_dtype(pred)));
  const int64_t* rg = ranges.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pred.scalar_type(), "masked_mse_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* p = pred.data_ptr<scalar_t>();
    const scalar_t* t = target.data_ptr<scalar_t>();
    std::vector<A> part(B * C), means(B);
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t b = k / C, c = k % C;
        int64_t lo, hi;
        chunk_bounds(clamp_range(rg[2 * b], rg[2 * b + 1], L), D, c, &lo, &hi);
        const int64_t off = b * L * D;
        // in the CUDA kernel's order (partial_kernel), so both devices give the same bits
        A lanes[kThreads];
        thread_sums(p + off + lo, t + off + lo, hi - lo, lanes);
        part[k] = block_sum(lanes);
      }
    });
    for (int64_t b = 0; b < B; ++b)
      means[b] = sample_mean(part.data(), rg, b, C, L, D);
    // B == 0: 0/0, a NaN, as upstream's mean over nothing
    *loss.data_ptr<A>() = batch_mean(means.data(), B);
  });
  return loss;
}

at::Tensor backward_cpu(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target,
                        const at::Tensor& ranges) {
  check_inputs(pred, target, ranges);
  check_grad(grad, pred);
  at::Tensor grad_pred = at::empty_like(pred, at::MemoryFormat::Contiguous);
  const int64_t B = pred.size(0), L = pred.size(1), D = pred.size(2);
  const int64_t C = max_chunks(L, D);
  const int64_t* rg = ranges.data_ptr<int64_t>();
  if (grad_pred.numel() == 0)
    return grad_pred;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pred.scalar_type(), "masked_mse_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const A g = grad.item<double>();  // a CPU scalar: no device sync involved
    const scalar_t* p = pred.data_ptr<scalar_t>();
    const scalar_t* t = target.data_ptr<scalar_t>();
    scalar_t* gp = grad_pred.data_ptr<scalar_t>();
    // Chunk c of sample b covers elements [c*kChunk, (c+1)*kChunk) of the
    // sample, in range or not; out-of-range elements get zeros.
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t b = k / C, c = k % C;
        const Range r = clamp_range(rg[2 * b], rg[2 * b + 1], L);
        const int64_t off = b * L * D;
        const int64_t a0 = c * kChunk, a1 = std::min(a0 + kChunk, L * D);
        const int64_t lo = std::min(std::max(a0, r.start * D), a1);
        const int64_t hi = std::max(std::min(a1, r.end * D), lo);
        std::fill(gp + off + a0, gp + off + lo, scalar_t(0));
        std::fill(gp + off + hi, gp + off + a1, scalar_t(0));
        if (hi > lo)
          cpu_isa::run<Grad<scalar_t>>(p + off + lo, t + off + lo, gp + off + lo, hi - lo, grad_scale(g, r, D, B));
      }
    });
  });
  return grad_pred;
}

}  // namespace

namespace {
// __shfl_down_sync tree of masked_mse_cuda.cu's block_sum, on an array of the
// block's kThreads per-thread values (lanes past the warp keep their own value).
template <typename A>
A emulate_block_sum(std::vector<A> v) {
  auto warp_tree = [](A* w) {
    for (int o = 16; o > 0; o /= 2) {
      A next[32];
      for (int lane = 0; lane < 32; ++lane)
        next[lane] = w[lane] + (lane + o < 32 ? w[lane + o] : w[lane]);
      std::copy(next, next + 32, w);
    }
    return w[0];
  };
  A warp_sums[32] = {};
  for (int w = 0; w < kThreads / 32; ++w)
    warp_sums[w] = warp_tree(v.data() + 32 * w);
  for (int lane = kThreads / 32; lane < 32; ++lane)
    warp_sums[lane] = A(0);
  return warp_tree(warp_sums);
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> grid_walk(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target,
                                             const at::Tensor& ranges) {
  check_inputs(pred, target, ranges);
  check_grad(grad, pred);
  const at::Tensor g = grad.to(acc_dtype(pred));
  at::Tensor loss = at::empty({}, pred.options().dtype(acc_dtype(pred)));
  // NaN where no thread stores: an element the grid misses shows in the result
  at::Tensor grad_pred = at::full_like(pred, std::numeric_limits<double>::quiet_NaN(), at::MemoryFormat::Contiguous);
  const int64_t B = pred.size(0), L = pred.size(1), D = pred.size(2), C = max_chunks(L, D);
  const int64_t* rg = ranges.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pred.scalar_type(), "masked_mse_walk", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* p = pred.data_ptr<scalar_t>();
    const scalar_t* t = target.data_ptr<scalar_t>();
    std::vector<A> partial(B * C), means(B), lanes(kThreads);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c) {
        for (int th = 0; th < kThreads; ++th)
          lanes[th] = partial_thread_sum(p, t, rg, L, D, b, c, th);
        partial[b * C + c] = emulate_block_sum(lanes);
      }
    for (int64_t b = 0; b < B; ++b)
      means[b] = sample_mean(partial.data(), rg, b, C, L, D);
    *loss.data_ptr<A>() = batch_mean(means.data(), B);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c)
        for (int th = 0; th < kThreads; ++th)
          grad_thread(g.data_ptr<A>(), p, t, rg, grad_pred.data_ptr<scalar_t>(), B, L, D, b, c, th);
  });
  return {loss, grad_pred};
}

namespace {
at::Tensor loss_ranges_cpu(const at::Tensor& frame_mask, int64_t hw, bool upstream) {
  check_loss_ranges(frame_mask, hw);
  const int64_t B = frame_mask.size(0), T = frame_mask.size(1);
  at::Tensor out = at::empty({B, 2}, frame_mask.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  AT_DISPATCH_V2(frame_mask.scalar_type(), "loss_ranges_cpu", AT_WRAP([&] {
                   const scalar_t* m = frame_mask.const_data_ptr<scalar_t>();
                   for (int64_t b = 0; b < B; ++b)
                     frame_range(m + b * frame_mask.stride(0), frame_mask.stride(1), T, hw, upstream, o + 2 * b);
                 }),
                 OSF_MASK_TYPES);
  return out;
}
}  // namespace

}  // namespace masked_mse
}  // namespace opensora_fast

TORCH_LIBRARY_IMPL(opensora_fast, CPU, m) {
  m.impl("loss_ranges", &opensora_fast::masked_mse::loss_ranges_cpu);
  m.impl("masked_mse", &opensora_fast::masked_mse::forward_cpu);
  m.impl("masked_mse_backward", &opensora_fast::masked_mse::backward_cpu);
  m.impl("_masked_mse_grid_walk", &opensora_fast::masked_mse::grid_walk);
}
