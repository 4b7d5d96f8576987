// Shared by the .cu files whose launch tables travel as kernel arguments.
#pragma once

#include <cuda_runtime_api.h>

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
// built with and the driver we run on (and sm_70+, below every arch we build);
// otherwise the ops use their 4 KiB tables.
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

}  // namespace opensora_fast
