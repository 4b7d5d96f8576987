// Conditioning on the GPU: launches over the tables planned by condition.h.
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

#include "../cuda_launch.cuh"
#include "condition.h"
#include "condition_ops.h"

namespace opensora_fast {
namespace condition {

namespace {

constexpr int64_t kMaxGridY = 65535;

template <typename D, typename S, typename Table>
__global__ void __launch_bounds__(kThreads)
    condition_kernel(const OSF_GRID_CONSTANT Table tab, const Geometry g, int channel_base) {
  block_body<D, S>(tab, g, blockIdx.x, channel_base + blockIdx.y, threadIdx.x, blockDim.x);
}

template <typename Table>
void launch_all(const Geometry& g, at::TensorList sources, const std::vector<Piece>& pieces,
                c10::ScalarType out_dtype, cudaStream_t stream) {
  const std::vector<Source> srcs = sources_of(sources);
  for (const Group& grp : group_by_dtype(pieces, sources)) {
    dispatch_pair(out_dtype, grp.src_dtype, [&](auto dt, auto st) {
      using D = typename decltype(dt)::type;
      using S = typename decltype(st)::type;
      for (const Table& tab : plan_launches<Table>(grp.pieces, srcs, g.H * g.W)) {
        if (tab.n_blocks == 0) continue;
        for (int64_t y0 = 0; y0 < 1 + g.C; y0 += kMaxGridY) {
          const unsigned ny = static_cast<unsigned>(std::min<int64_t>(kMaxGridY, 1 + g.C - y0));
          condition_kernel<D, S, Table><<<dim3(tab.n_blocks, ny), kThreads, 0, stream>>>(tab, g, static_cast<int>(y0));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
    });
  }
}

void run_cuda(const Geometry& g, at::TensorList sources, const std::vector<Piece>& pieces, c10::ScalarType out_dtype,
              const c10::Device& device) {
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // The big table only when the small one would take more than one launch per
  // dtype group: the driver copies the whole argument block at every launch,
  // and 32 KiB of it costs the host more than the kernel takes at 256px.
  bool small_fits = true;
  if (big_kernel_args()) {
    const std::vector<Source> srcs = sources_of(sources);
    for (const Group& grp : group_by_dtype(pieces, sources))
      small_fits = small_fits && plan_launches<SmallTable>(grp.pieces, srcs, g.H * g.W).size() <= 1;
  }
  if (small_fits)
    launch_all<SmallTable>(g, sources, pieces, out_dtype, stream);
  else
    launch_all<BigTable>(g, sources, pieces, out_dtype, stream);
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& z, at::TensorList sources, c10::IntArrayRef plan) {
  check_inputs("condition", z, sources, plan);
  const int64_t B = z.size(0), C = z.size(1), T = z.size(2), H = z.size(3), W = z.size(4);
  at::Tensor masks = at::empty({B, 1, T, H, W}, z.options().memory_format(c10::MemoryFormat::Contiguous));
  at::Tensor masked = at::empty({B, C, T, H, W}, z.options().memory_format(c10::MemoryFormat::Contiguous));
  if (masks.numel() == 0) return {masks, masked};  // H*W or T or B is 0: nothing to write
  run_cuda(geometry(masks, masked), sources,
           make_pieces(std::vector<int64_t>(plan.begin(), plan.end()), B, T), z.scalar_type(), z.device());
  return {masks, masked};
}

void cat_cuda(at::Tensor& cond, at::TensorList sources, c10::IntArrayRef plan) {
  check_inputs("condition_cat_", cond, sources, plan);
  if (cond.numel() == 0) return;
  run_cuda(cat_geometry(cond), sources,
           make_pieces(std::vector<int64_t>(plan.begin(), plan.end()), cond.size(0), cond.size(2)),
           cond.scalar_type(), cond.device());
}

}  // namespace
}  // namespace condition
}  // namespace opensora_fast

TORCH_LIBRARY_IMPL(opensora_fast, CUDA, m) {
  m.impl("condition", &opensora_fast::condition::forward_cuda);
  m.impl("condition_cat_", &opensora_fast::condition::cat_cuda);
}
