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

// Tree sum of the block's kThreads values; _grid_walk_masked_mse (CPU) mirrors it.
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
  const acc_t<T> v = block_sum(partial_thread_sum(p, t, ranges, L, D, blockIdx.y, blockIdx.x, threadIdx.x));
  if (threadIdx.x == 0) partial[blockIdx.y * gridDim.x + blockIdx.x] = v;
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
  grad_thread(grad, p, t, ranges, gp, B, L, D, blockIdx.y, blockIdx.x, threadIdx.x);
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
