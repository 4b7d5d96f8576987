// The GPU half of the multi-tensor launch core (multi_tensor.h): the one kernel
// template every table-walking op launches, the big/small table choice, and the
// launch loop.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "multi_tensor.h"

// __grid_constant__ lets a kernel's body take its table by reference without
// the compiler copying it (up to 32 KB) into every thread's local memory (it
// would in -G debug builds).
#if CUDART_VERSION >= 11070
#define OSF_GRID_CONSTANT __grid_constant__
#else
#define OSF_GRID_CONSTANT
#endif

namespace opensora_fast {

// Kernel arguments over 4 KiB need CUDA >= 12.1 in both the toolkit we were
// built with and the driver we run on (and sm_70+, below every arch we build).
inline bool big_kernel_args() {
#if CUDART_VERSION >= 12010
  static const bool ok = [] {
    int v = 0;
    return cudaDriverGetVersion(&v) == cudaSuccess && v >= 12010;
  }();
  return ok;
#else
  return false;
#endif
}

// The one place that picks the table size: the small tables when big kernel
// arguments do not work here, when the tests force them, or when the op says the
// small ones suffice (`small_suffices`: e.g. they take a single launch, and
// the driver copies the whole argument block at every launch).
inline bool use_small_tables(bool small_suffices = false) {
  return small_suffices || force_small_tables() || !big_kernel_args();
}

// Calls f(Tag<Big>{}) or f(Tag<Small>{}) as use_small_tables decides.
// small_suffices: a bool, or a callable returning one, called only when the
// big tables are possible (so an op's planning for the answer costs nothing
// where it cannot matter).
template <typename Big, typename Small, typename Suffices, typename F>
inline void with_table(Suffices&& small_suffices, F&& f) {
  bool small;
  if constexpr (std::is_invocable_r<bool, Suffices>::value)
    small = use_small_tables() || small_suffices();
  else
    small = use_small_tables(small_suffices);
  if (small)
    f(Tag<Small>{});
  else
    f(Tag<Big>{});
}

template <typename Body, int Threads, typename Table, typename Args>
__global__ void __launch_bounds__(Threads)
    multi_tensor_kernel(const OSF_GRID_CONSTANT Table tab, const Args args, int y_base) {
  Body::run(tab, args, blockIdx.x, y_base + static_cast<int>(blockIdx.y), threadIdx.x, blockDim.x);
}

// Launches every table on `stream`, grid (n_blocks, grid_y) with Threads threads,
// grid_y split into launches of at most 65535 rows; checks each launch.
template <typename Body, int Threads, typename Table, typename Args>
inline void launch_tables(const std::vector<Table>& tables, const Args& args, cudaStream_t stream, int64_t grid_y = 1) {
  constexpr int64_t kMaxGridY = 65535;
  for (const Table& tab : tables) {
    if (tab.n_blocks == 0)
      continue;
    for (int64_t y0 = 0; y0 < grid_y; y0 += kMaxGridY) {
      const unsigned ny = static_cast<unsigned>(std::min<int64_t>(kMaxGridY, grid_y - y0));
      multi_tensor_kernel<Body, Threads, Table, Args>
          <<<dim3(static_cast<unsigned>(tab.n_blocks), ny), Threads, 0, stream>>>(tab, args, static_cast<int>(y0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

// The persistent kernel over one strided table (multi_tensor.h): MinBlocks is
// the blocks per SM the registers must allow (__launch_bounds__).
template <typename Body, int Threads, int MinBlocks, typename Table, typename Args>
__global__ void __launch_bounds__(Threads, MinBlocks)
    strided_kernel(const OSF_GRID_CONSTANT Table tab, const Args args) {
  Body::run(tab, args, static_cast<int>(blockIdx.x), static_cast<int>(gridDim.x), static_cast<int>(threadIdx.x),
            static_cast<int>(blockDim.x));
}

// Blocks of strided_kernel<...> that fit the current device at once: SMs times
// the resident blocks per SM (at least one of each).
template <typename Body, int Threads, int MinBlocks, typename Table, typename Args>
inline int64_t strided_resident_blocks() {
  int dev = 0, sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, strided_kernel<Body, Threads, MinBlocks, Table, Args>, Threads, 0));
  return static_cast<int64_t>(std::max(sms, 1)) * std::max(per_sm, 1);
}

// Launches every strided table on `stream` (one launch each) with a grid of
// strided_grid(n_units, resident blocks) blocks of Threads threads, the grid
// walk_strided walks on the CPU; checks each launch.
template <typename Body, int Threads, int MinBlocks, typename Table, typename Args>
inline void launch_strided(const std::vector<Table>& tables, const Args& args, cudaStream_t stream) {
  if (tables.empty())
    return;
  const int64_t resident = strided_resident_blocks<Body, Threads, MinBlocks, Table, Args>();
  for (const Table& tab : tables) {
    const int grid = strided_grid(tab.n_units, resident);
    if (tab.n_units == 0)
      continue;
    strided_kernel<Body, Threads, MinBlocks, Table, Args>
        <<<static_cast<unsigned>(grid), Threads, 0, stream>>>(tab, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace opensora_fast
