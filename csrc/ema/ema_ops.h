// Host entry points of the EMA op. The dispatcher calls ema_update_cpu or
// ema_update_cuda (see registration.cpp); both assume check_ema_inputs passed.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

namespace opensora_fast {
namespace ema {

// Validates everything before anything is written; errors name the argument
// and the pair index (ValueError / TypeError in Python).
void check_ema_inputs(at::TensorList ema, at::TensorList src, double decay);

void ema_update_cpu(at::TensorList ema, at::TensorList src, double decay, bool stochastic,
                    int64_t seed);

// Runs the CUDA kernel's per-block body over the whole launch grid on the CPU,
// one block and one thread at a time: a test of the GPU geometry and indexing.
// max_tensors / max_blocks: launch-table limits (0: the CUDA path's own).
void ema_grid_walk_cpu(at::TensorList ema, at::TensorList src, double decay, bool stochastic,
                       int64_t seed, int64_t max_tensors, int64_t max_blocks);

// The pairs of one (ema dtype, src dtype) combination, in call order, as the
// GPU launch planner wants them. index_base: position of each pair's first
// element in the whole call (pairs laid end to end), for stochastic rounding.
struct DtypeGroup {
  c10::ScalarType ema_dtype, src_dtype;
  std::vector<void*> ema;
  std::vector<const void*> src;
  std::vector<int64_t> numel, index_base;
};

inline std::vector<DtypeGroup> group_by_dtype(at::TensorList ema, at::TensorList src) {
  std::vector<DtypeGroup> groups;
  int64_t base = 0;
  for (size_t i = 0; i < ema.size(); ++i) {
    const int64_t n = ema[i].numel();
    if (n > 0) {
      const auto e = ema[i].scalar_type(), s = src[i].scalar_type();
      auto g = std::find_if(groups.begin(), groups.end(), [&](const DtypeGroup& x) {
        return x.ema_dtype == e && x.src_dtype == s;
      });
      if (g == groups.end()) g = groups.insert(groups.end(), DtypeGroup{e, s, {}, {}, {}, {}});
      g->ema.push_back(ema[i].data_ptr());
      g->src.push_back(src[i].data_ptr());
      g->numel.push_back(n);
      g->index_base.push_back(base);
    }
    base += n;
  }
  return groups;
}

#ifdef OSF_WITH_CUDA
void ema_update_cuda(at::TensorList ema, at::TensorList src, double decay, bool stochastic,
                     int64_t seed);
#endif

}  // namespace ema
}  // namespace opensora_fast
