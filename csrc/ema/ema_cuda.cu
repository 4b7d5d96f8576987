// EMA on the GPU: multi-tensor launches over tables planned by ema.h. Inputs
// were checked by check_ema_inputs (registration.cpp) before we get here.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ema.h"
#include "ema_ops.h"

namespace opensora_fast {
namespace ema {

template <typename E, typename S>
__global__ void __launch_bounds__(kThreads) ema_kernel(const LaunchTable tab, const Params p) {
  ema_block_body<E, S>(tab, p, blockIdx.x, threadIdx.x, blockDim.x);
}

void ema_update_cuda(at::TensorList ema, at::TensorList src, double decay, bool stochastic,
                     int64_t seed) {
  if (ema.empty()) return;
  const c10::cuda::CUDAGuard guard(ema[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Planning reads only pointers and sizes: no host sync.
  for (const DtypeGroup& g : group_by_dtype(ema, src)) {
    dispatch_pair(g.ema_dtype, g.src_dtype, [&](auto et, auto st) {
      using E = typename decltype(et)::type;
      using S = typename decltype(st)::type;
      const Params p = make_params<E, S>(decay, stochastic, seed);
      for (const LaunchTable& tab : plan_launches(g.ema, g.src, g.numel, g.index_base)) {
        ema_kernel<E, S><<<tab.n_blocks, kThreads, 0, stream>>>(tab, p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
}

}  // namespace ema
}  // namespace opensora_fast
