// Unpad on the GPU: one launch per table of the shared launch core (one per bucket
// unless it holds more than 256 entries or 3072 chunks), on the current
// stream, no host sync. Destinations may be device memory or pinned host
// memory (written over the bus by the kernel, no staging copy).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../multi_tensor_cuda.cuh"
#include "unpad.h"
#include "unpad_ops.h"

namespace opensora_fast {
namespace unpad {

namespace {

void forward_cuda(const at::Tensor& gathered, at::TensorList out, at::IntArrayRef offset, at::IntArrayRef shard,
                  at::IntArrayRef begin, at::IntArrayRef count) {
  check_inputs(gathered, out, offset, shard, begin, count);
  if (out.empty() || gathered.numel() == 0)
    return;
  const c10::cuda::CUDAGuard guard(gathered.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Planning reads only pointers and sizes: no host sync.
  const Plan p = make_plan(gathered, out, offset, shard, begin, count);
  const Args a{gathered.data_ptr(), p.bucket};
  dispatch_unit(p.unit, [&](auto u) {
    using U = decltype(u);
    with_table<BigTable, SmallTable>(false, [&](auto tt) {
      using Table = typename decltype(tt)::type;
      launch_tables<Body<U>, kThreads>(plan_tables<Table>(p), a, stream);
    });
  });
}

}  // namespace

}  // namespace unpad
}  // namespace opensora_fast

TORCH_LIBRARY_IMPL(opensora_fast, CUDA, m) {
  m.impl("unpad_", &opensora_fast::unpad::forward_cuda);
}
