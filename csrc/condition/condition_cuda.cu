// Conditioning on the GPU: the shared launch core's tables of pieces, walked by
// Body (condition.h).
// Inputs are checked by check_inputs (condition.cpp) first; planning reads only
// pointers, sizes and the host-side plan, so nothing here syncs with the device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../multi_tensor_cuda.cuh"
#include "condition.h"
#include "condition_ops.h"

namespace opensora_fast {
namespace condition {

namespace {

void run_cuda(const Geometry& g, at::TensorList sources, const std::vector<Piece>& pieces, c10::ScalarType out_dtype,
              const c10::Device& device) {
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const std::vector<Source> srcs = sources_of(sources);
  const std::vector<Group> groups = group_by_dtype(pieces, sources);
  const int64_t HW = g.H * g.W;
  // The small tables suffice when they take one launch per dtype group: the
  // driver copies the whole argument block at every launch, and 32 KiB of it
  // costs the host more than the kernel takes at 256px.
  const auto small_suffices = [&] {
    for (const Group& grp : groups)
      if (plan_tables<SmallTable>(grp.pieces, srcs, HW).size() > 1)
        return false;
    return true;
  };
  with_table<BigTable, SmallTable>(small_suffices, [&](auto tt) {
    using Table = typename decltype(tt)::type;
    for (const Group& grp : groups) {
      dispatch_pair(out_dtype, grp.src_dtype, [&](auto dt, auto st) {
        using D = typename decltype(dt)::type;
        using S = typename decltype(st)::type;
        launch_tables<Body<D, S>, kThreads>(plan_tables<Table>(grp.pieces, srcs, HW), g, stream, 1 + g.C);
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& z, at::TensorList sources, c10::IntArrayRef plan) {
  check_inputs("condition", z, sources, plan);
  const int64_t B = z.size(0), C = z.size(1), T = z.size(2), H = z.size(3), W = z.size(4);
  at::Tensor masks = at::empty({B, 1, T, H, W}, z.options().memory_format(c10::MemoryFormat::Contiguous));
  at::Tensor masked = at::empty({B, C, T, H, W}, z.options().memory_format(c10::MemoryFormat::Contiguous));
  if (masks.numel() == 0)
    return {masks, masked};  // H*W or T or B is 0: nothing to write
  run_cuda(geometry(masks, masked), sources, make_pieces(std::vector<int64_t>(plan.begin(), plan.end()), B, T),
           z.scalar_type(), z.device());
  return {masks, masked};
}

void cat_cuda(at::Tensor& cond, at::TensorList sources, c10::IntArrayRef plan) {
  check_inputs("condition_cat_", cond, sources, plan);
  if (cond.numel() == 0)
    return;
  run_cuda(cat_geometry(cond), sources,
           make_pieces(std::vector<int64_t>(plan.begin(), plan.end()), cond.size(0), cond.size(2)), cond.scalar_type(),
           cond.device());
}

}  // namespace
}  // namespace condition
}  // namespace opensora_fast

TORCH_LIBRARY_IMPL(opensora_fast, CUDA, m) {
  m.impl("condition", &opensora_fast::condition::forward_cuda);
  m.impl("condition_cat_", &opensora_fast::condition::cat_cuda);
}
