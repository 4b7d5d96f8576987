// AdamW+EMA on the GPU: the shared launch core's tables of entries, walked by
// Body (adamw_ema.h) on the current stream. Planning reads pointers, sizes and
// the steps (CPU scalars): no host sync.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../multi_tensor_cuda.cuh"
#include "adamw_ema.h"
#include "adamw_ema_ops.h"

namespace opensora_fast {
namespace adamw_ema {

namespace {

void forward_cuda(const Call& c) {
  check_inputs(c);
  if (c.params.empty() && c.ema.empty())
    return;
  const at::Tensor& first = c.params.empty() ? c.ema[0] : c.params[0];
  const c10::cuda::CUDAGuard guard(first.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // The steps and the bias corrections derived from them live on the host,
  // and a stochastic seed is a kernel argument: a replay of a captured graph
  // would repeat one step's constants forever.
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  TORCH_CHECK(status == cudaStreamCaptureStatusNone,
              "adamw_ema_: cannot be captured in a CUDA graph (its steps and bias corrections are host values "
              "that a replay would not update); run the optimizer step outside the graph");
  for (const EntryGroup& g : prepare(c)) {
    dispatch_ema(g.ema_dtype, [&](auto et) {
      using E = typename decltype(et)::type;
      const Args a = ema::make_params<E, float>(c.decay, c.stochastic, c.seed);
      with_table<BigTable, SmallTable>(false, [&](auto tt) {
        using Table = typename decltype(tt)::type;
        const auto tables = plan_launches<Table>(g.entries, [&](size_t i) { return blocks_of(g.entries[i]); });
        launch_tables<Body<E>, kThreads>(tables, a, stream);
      });
    });
  }
}

}  // namespace

}  // namespace adamw_ema
}  // namespace opensora_fast

TORCH_LIBRARY_IMPL(opensora_fast, CUDA, m) {
  m.impl("adamw_ema_", &opensora_fast::adamw_ema::as_op<&opensora_fast::adamw_ema::forward_cuda>);
}
