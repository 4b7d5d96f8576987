// Masked MSE on the GPU: one block per (chunk, sample) for the partial sums and
// the gradient, one small block for the final mean. Inputs were checked by
// check_inputs (registration.cpp). Nothing here reads device memory on the host.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "masked_mse.h"
#include "masked_mse_ops.h"

namespace opensora_fast {
namespace masked_mse {

namespace {

template <typename A>
__device__ A block_sum(A v) {
  __shared__ A warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_sums[lane] : A(0);
    for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;  // valid in thread 0
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    partial_kernel(const T* __restrict__ p, const T* __restrict__ t, const int64_t* __restrict__ ranges,
                   acc_t<T>* __restrict__ partial, int64_t L, int64_t D) {
  using A = acc_t<T>;
  const int64_t b = blockIdx.y, c = blockIdx.x, C = gridDim.x;
  int64_t lo, hi;
  chunk_bounds(clamp_range(ranges[2 * b], ranges[2 * b + 1], L), D, c, &lo, &hi);
  const T* pb = p + b * L * D + lo;
  const T* tb = t + b * L * D + lo;
  const int64_t n = hi - lo;
  constexpr int V = 16 / sizeof(T);
  A acc = 0;
  int64_t done = 0;
  if (reinterpret_cast<uintptr_t>(pb) % 16 == 0 && reinterpret_cast<uintptr_t>(tb) % 16 == 0) {
    for (int64_t v = threadIdx.x; v < n / V; v += kThreads) {
      const VecN<T, V> pv = reinterpret_cast<const VecN<T, V>*>(pb)[v];
      const VecN<T, V> tv = reinterpret_cast<const VecN<T, V>*>(tb)[v];
      OSF_UNROLL
      for (int k = 0; k < V; ++k) acc += sq_diff(pv.v[k], tv.v[k]);
    }
    done = n / V * V;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += kThreads) acc += sq_diff(pb[i], tb[i]);
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[b * C + c] = acc;
}

template <typename A>
__global__ void finish_kernel(const A* __restrict__ partial, const int64_t* __restrict__ ranges,
                              A* __restrict__ loss, int64_t B, int64_t C, int64_t L, int64_t D) {
  extern __shared__ unsigned char smem[];
  A* means = reinterpret_cast<A*>(smem);
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) means[b] = sample_mean(partial, ranges, b, C, L, D);
  __syncthreads();
  if (threadIdx.x == 0) *loss = batch_mean(means, B);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_kernel(const acc_t<T>* __restrict__ grad, const T* __restrict__ p, const T* __restrict__ t,
                const int64_t* __restrict__ ranges, T* __restrict__ gp, int64_t L, int64_t D, int64_t B) {
  using A = acc_t<T>;
  const int64_t b = blockIdx.y, c = blockIdx.x;
  const Range r = clamp_range(ranges[2 * b], ranges[2 * b + 1], L);
  const int64_t a0 = c * kChunk, a1 = (a0 + kChunk < L * D) ? a0 + kChunk : L * D;
  const int64_t lo = r.start * D, hi = r.end * D;
  const A scale = hi > lo ? *grad / (static_cast<A>(hi - lo) * static_cast<A>(B)) : A(0);
  const int64_t off = b * L * D;
  for (int64_t i = a0 + threadIdx.x; i < a1; i += kThreads)
    gp[off + i] = (i >= lo && i < hi) ? grad_elem(p[off + i], t[off + i], scale) : T(0);
}

}  // namespace

void forward_cuda(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& ranges,
                  at::Tensor& partial, at::Tensor& loss) {
  const c10::cuda::CUDAGuard guard(pred.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = pred.size(0), L = pred.size(1), D = pred.size(2), C = partial.size(1);
  if (B == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pred.scalar_type(), "masked_mse_cuda", [&] {
    using A = acc_t<scalar_t>;
    partial_kernel<scalar_t><<<dim3(C, B), kThreads, 0, stream>>>(
        pred.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(), ranges.data_ptr<int64_t>(),
        partial.data_ptr<A>(), L, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_kernel<A><<<1, 256, B * sizeof(A), stream>>>(partial.data_ptr<A>(), ranges.data_ptr<int64_t>(),
                                                        loss.data_ptr<A>(), B, C, L, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward_cuda(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target,
                   const at::Tensor& ranges, at::Tensor& grad_pred) {
  const c10::cuda::CUDAGuard guard(pred.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = pred.size(0), L = pred.size(1), D = pred.size(2);
  if (B == 0 || L * D == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pred.scalar_type(), "masked_mse_bwd_cuda", [&] {
    using A = acc_t<scalar_t>;
    grad_kernel<scalar_t><<<dim3(max_chunks(L, D), B), kThreads, 0, stream>>>(
        grad.data_ptr<A>(), pred.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(),
        ranges.data_ptr<int64_t>(), grad_pred.data_ptr<scalar_t>(), L, D, B);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace masked_mse
}  // namespace opensora_fast
