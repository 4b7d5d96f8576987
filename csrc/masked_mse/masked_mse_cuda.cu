// Masked MSE on the GPU: one block per (sample, chunk) for the partial sums, a
// grid striding over the (sample, chunk) items for the gradient, then
// per-sample means and their fixed-order mean. Nothing
// here reads device memory on the host, so the ops never sync and can be
// captured in a CUDA graph.
#include <ATen/Dispatch.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "masked_mse.h"
#include "masked_mse_ops.h"

namespace opensora_fast {
namespace masked_mse {

namespace {

// Tree sum of the block's kThreads values; the CPU grid walk (emulate_block_sum)
// mirrors it step for step.
template <typename A>
__device__ A block_sum(A v) {
  __shared__ A warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o /= 2)
    v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0)
    warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_sums[lane] : A(0);
    for (int o = 16; o > 0; o /= 2)
      v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;  // valid in thread 0
}

// Blocks are numbered b * C + c in one grid dimension (2^31 - 1 blocks), so
// any batch size launches; the index is 64-bit before it is split.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    partial_kernel(const T* __restrict__ p, const T* __restrict__ t, const int64_t* __restrict__ ranges,
                   acc_t<T>* __restrict__ partial, int64_t L, int64_t D, int64_t C) {
  const int64_t block = blockIdx.x;
  const acc_t<T> v = block_sum(partial_thread_sum(p, t, ranges, L, D, block / C, block % C, threadIdx.x));
  if (threadIdx.x == 0)
    partial[block] = v;
}

template <typename A>
__global__ void sample_means_kernel(const A* __restrict__ partial, const int64_t* __restrict__ ranges,
                                    A* __restrict__ means, int64_t B, int64_t C, int64_t L, int64_t D) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < B)
    means[b] = sample_mean(partial, ranges, b, C, L, D);
}

// One thread, samples in order: the same order (and bits) as the CPU.
template <typename A>
__global__ void batch_mean_kernel(const A* __restrict__ means, A* __restrict__ loss, int64_t B) {
  *loss = batch_mean(means, B);
}

// A grid of at most kGradBlocksPerSM blocks per SM, each striding over the
// B * C work items (b * C + c): no launch limit on B * C, no tail wave of
// short blocks.
constexpr int kGradBlocksPerSM = 8;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_kernel(const acc_t<T>* __restrict__ grad, const T* __restrict__ p, const T* __restrict__ t,
                const int64_t* __restrict__ ranges, T* __restrict__ gp, int64_t B, int64_t L, int64_t D, int64_t C) {
  for (int64_t item = blockIdx.x; item < B * C; item += gridDim.x)
    grad_thread(grad, p, t, ranges, gp, B, L, D, item / C, item % C, threadIdx.x);
}

void check_grid(int64_t blocks) {
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), "masked_mse: ", blocks,
                    " blocks of work is more than one CUDA grid holds");
}

at::Tensor forward_cuda(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& ranges) {
  check_inputs(pred, target, ranges);
  const c10::cuda::CUDAGuard guard(pred.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = pred.size(0), L = pred.size(1), D = pred.size(2), C = max_chunks(L, D);
  check_grid(B * C);
  const auto opts = pred.options().dtype(acc_dtype(pred));
  at::Tensor loss = at::empty({}, opts);
  at::Tensor partial = at::empty({B * C}, opts);
  at::Tensor means = at::empty({B}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pred.scalar_type(), "masked_mse_cuda", [&] {
    using A = acc_t<scalar_t>;
    if (B > 0) {
      partial_kernel<scalar_t><<<B * C, kThreads, 0, stream>>>(pred.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(),
                                                               ranges.data_ptr<int64_t>(), partial.data_ptr<A>(), L, D,
                                                               C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sample_means_kernel<A><<<ceil_div<int64_t>(B, 256), 256, 0, stream>>>(
          partial.data_ptr<A>(), ranges.data_ptr<int64_t>(), means.data_ptr<A>(), B, C, L, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    batch_mean_kernel<A><<<1, 1, 0, stream>>>(means.data_ptr<A>(), loss.data_ptr<A>(), B);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return loss;
}

at::Tensor backward_cuda(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target,
                         const at::Tensor& ranges) {
  check_inputs(pred, target, ranges);
  check_grad(grad, pred);
  const c10::cuda::CUDAGuard guard(pred.device());
  at::Tensor grad_pred = at::empty_like(pred, at::MemoryFormat::Contiguous);
  if (grad_pred.numel() == 0)
    return grad_pred;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = pred.size(0), L = pred.size(1), D = pred.size(2), C = max_chunks(L, D);
  int sms = 0;  // of pred's device (the guard made it current)
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, pred.get_device()));
  const int64_t blocks = std::min<int64_t>(B * C, static_cast<int64_t>(std::max(sms, 1)) * kGradBlocksPerSM);
  const at::Tensor g = grad.to(acc_dtype(pred));  // on the device: no sync
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pred.scalar_type(), "masked_mse_bwd_cuda", [&] {
    using A = acc_t<scalar_t>;
    grad_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(g.data_ptr<A>(), pred.data_ptr<scalar_t>(),
                                                           target.data_ptr<scalar_t>(), ranges.data_ptr<int64_t>(),
                                                           grad_pred.data_ptr<scalar_t>(), B, L, D, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_pred;
}

// One thread per sample, the CPU's frame_range.
template <typename M>
__global__ void loss_ranges_kernel(const M* __restrict__ m, int64_t s0, int64_t s1, int64_t B, int64_t T, int64_t hw,
                                   bool upstream, int64_t* __restrict__ out) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < B)
    frame_range(m + b * s0, s1, T, hw, upstream, out + 2 * b);
}

at::Tensor loss_ranges_cuda(const at::Tensor& frame_mask, int64_t hw, bool upstream) {
  check_loss_ranges(frame_mask, hw);
  const c10::cuda::CUDAGuard guard(frame_mask.device());
  const int64_t B = frame_mask.size(0), T = frame_mask.size(1);
  at::Tensor out = at::empty({B, 2}, frame_mask.options().dtype(at::kLong));
  if (B == 0)
    return out;
  check_grid(ceil_div<int64_t>(B, 256));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_V2(frame_mask.scalar_type(), "loss_ranges_cuda", AT_WRAP([&] {
                   loss_ranges_kernel<scalar_t><<<ceil_div<int64_t>(B, 256), 256, 0, stream>>>(
                       frame_mask.const_data_ptr<scalar_t>(), frame_mask.stride(0), frame_mask.stride(1), B, T, hw,
                       upstream, out.data_ptr<int64_t>());
                   C10_CUDA_KERNEL_LAUNCH_CHECK();
                 }),
                 OSF_MASK_TYPES);
  return out;
}

}  // namespace

}  // namespace masked_mse
}  // namespace opensora_fast

TORCH_LIBRARY_IMPL(opensora_fast, CUDA, m) {
  m.impl("loss_ranges", &opensora_fast::masked_mse::loss_ranges_cuda);
  m.impl("masked_mse", &opensora_fast::masked_mse::forward_cuda);
  m.impl("masked_mse_backward", &opensora_fast::masked_mse::backward_cuda);
}
