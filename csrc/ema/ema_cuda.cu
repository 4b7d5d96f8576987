// EMA on the GPU: the shared launch core's strided tables of pairs, walked by
// a persistent grid running Body (ema.h) on the current stream, no host sync.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../multi_tensor_cuda.cuh"
#include "ema.h"
#include "ema_ops.h"

namespace opensora_fast {
namespace ema {

namespace {

void run_cuda(at::TensorList ema, at::TensorList src, double decay, bool stochastic, int64_t seed) {
  if (ema.empty())
    return;
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
  // Planning reads only pointers and sizes: no host sync. One launch per
  // table of a persistent grid; the small tables where one suffices (the
  // driver copies the whole argument block at every launch).
  for (const DtypeGroup& g : group_by_dtype(ema, src)) {
    dispatch_pair(g.ema_dtype, g.src_dtype, [&](auto et, auto st) {
      using E = typename decltype(et)::type;
      using S = typename decltype(st)::type;
      const Args p = make_params<E, S>(decay, stochastic, seed);
      const bool one_small = g.entries.size() <= static_cast<size_t>(SmallTable::kMaxEntries);
      with_table<BigTable, SmallTable>(one_small, [&](auto tt) {
        using Table = typename decltype(tt)::type;
        const std::vector<Table> tables = plan<Table>(g.entries);
        if (p.stochastic)
          launch_strided<Body<E, S, true>, kThreads, min_blocks<E, S, true>()>(tables, p, stream);
        else
          launch_strided<Body<E, S, false>, kThreads, min_blocks<E, S, false>()>(tables, p, stream);
      });
    });
  }
}

void forward_cuda(at::TensorList ema, at::TensorList src, double decay, bool stochastic, int64_t seed) {
  check_inputs(ema, src, decay);
  run_cuda(ema, src, decay, stochastic, seed);
}

[[maybe_unused]] const bool registered = set_runner(c10::DeviceType::CUDA, &run_cuda);

}  // namespace

}  // namespace ema
}  // namespace opensora_fast

TORCH_LIBRARY_IMPL(opensora_fast, CUDA, m) {
  m.impl("ema_update_", &opensora_fast::ema::forward_cuda);
}
