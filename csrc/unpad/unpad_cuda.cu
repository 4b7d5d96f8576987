// Unpad on the GPU: one launch per table planned by unpad.h (one per bucket
// unless it holds more than 256 entries or 3072 chunks), on the current
// stream, no host sync. Destinations may be device memory or pinned host
// memory (written over the bus by the kernel, no staging copy).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cuda_launch.cuh"
#include "unpad.h"
#include "unpad_ops.h"

namespace opensora_fast {
namespace unpad {

namespace {

template <typename U, typename Table>
__global__ void __launch_bounds__(kThreads)
    unpad_kernel(const OSF_GRID_CONSTANT Table tab, const U* __restrict__ gathered, int64_t bucket) {
  unpad_block_body<U>(tab, gathered, bucket, blockIdx.x, threadIdx.x, blockDim.x);
}

template <typename Table>
void launch(const Plan& p, const void* gathered, cudaStream_t stream) {
  dispatch_unit(p.unit, [&](auto u) {
    using U = decltype(u);
    for (const Table& tab : plan_launches<Table>(p.dst, p.entries)) {
      unpad_kernel<U, Table><<<tab.n_blocks, kThreads, 0, stream>>>(tab, static_cast<const U*>(gathered), p.bucket);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void forward_cuda(const at::Tensor& gathered, at::TensorList out, at::IntArrayRef offset, at::IntArrayRef shard,
                  at::IntArrayRef begin, at::IntArrayRef count) {
  check_inputs(gathered, out, offset, shard, begin, count);
  if (out.empty() || gathered.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(gathered.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Planning reads only pointers and sizes: no host sync.
  const Plan p = make_plan(gathered, out, offset, shard, begin, count);
  if (big_kernel_args())
    launch<BigTable>(p, gathered.data_ptr(), stream);
  else
    launch<SmallTable>(p, gathered.data_ptr(), stream);
}

}  // namespace

}  // namespace unpad
}  // namespace opensora_fast

TORCH_LIBRARY_IMPL(opensora_fast, CUDA, m) {
  m.impl("unpad_", &opensora_fast::unpad::forward_cuda);
}
