// EMA on the GPU: multi-tensor launches over tables planned by ema.h, on the
// current stream, no host sync.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cuda_launch.cuh"
#include "ema.h"
#include "ema_ops.h"

namespace opensora_fast {
namespace ema {

namespace {

template <typename E, typename S, typename Table>
__global__ void __launch_bounds__(kThreads) ema_kernel(const OSF_GRID_CONSTANT Table tab, const Params p) {
  ema_block_body<E, S>(tab, p, blockIdx.x, threadIdx.x, blockDim.x);
}

template <typename Table>
void launch_group(const DtypeGroup& g, double decay, bool stochastic, int64_t seed, cudaStream_t stream) {
  dispatch_pair(g.ema_dtype, g.src_dtype, [&](auto et, auto st) {
    using E = typename decltype(et)::type;
    using S = typename decltype(st)::type;
    const Params p = make_params<E, S>(decay, stochastic, seed);
    for (const Table& tab : plan_launches<Table>(g.ema, g.src, g.numel, g.index_base)) {
      ema_kernel<E, S, Table><<<tab.n_blocks, kThreads, 0, stream>>>(tab, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void forward_cuda(at::TensorList ema, at::TensorList src, double decay, bool stochastic, int64_t seed) {
  check_inputs(ema, src, decay);
  if (ema.empty()) return;
  const c10::cuda::CUDAGuard guard(ema[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (stochastic) {
    // The seed is a kernel argument: a captured graph would replay the same
    // random numbers every step and the rounding would no longer be unbiased.
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
    TORCH_CHECK(status == cudaStreamCaptureStatusNone,
                "ema_update_: stochastic rounding cannot be captured in a CUDA graph (each replay would reuse "
                "the same seed); capture the compat mode, or run the stochastic update outside the graph");
  }
  // Planning reads only pointers and sizes: no host sync.
  const bool big = big_kernel_args();
  for (const DtypeGroup& g : group_by_dtype(ema, src)) {
    if (big)
      launch_group<BigTable>(g, decay, stochastic, seed, stream);
    else
      launch_group<SmallTable>(g, decay, stochastic, seed, stream);
  }
}

}  // namespace

}  // namespace ema
}  // namespace opensora_fast

TORCH_LIBRARY_IMPL(opensora_fast, CUDA, m) {
  m.impl("ema_update_", &opensora_fast::ema::forward_cuda);
}
