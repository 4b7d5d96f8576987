// Host side of the EMA op, shared by ema.cpp (schema, checks), ema_cpu.cpp and
// ema_cuda.cu. Each device file registers its own kernel and calls
// check_inputs first, so nothing is written unless every pair is valid.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "ema.h"

namespace opensora_fast {
namespace ema {

// Validates everything before anything is written; errors name the argument
// and the pair index (ValueError / TypeError / RuntimeError in Python, the same
// text as opensora_fast/reference/ema.py check_inputs).
void check_inputs(at::TensorList ema, at::TensorList src, double decay);

// A device's kernel without check_inputs, for a caller that has validated these
// very tensors before (ema_plan.cpp). Each device file registers its own;
// nullptr for a device without a kernel built.
using Runner = void (*)(at::TensorList ema, at::TensorList src, double decay, bool stochastic, int64_t seed);
Runner runner(c10::DeviceType type);
bool set_runner(c10::DeviceType type, Runner run);

// The pairs of one (ema dtype, src dtype) combination, in call order, as the
// GPU launch planner wants them. Entry::index_base: position of each pair's
// first element in the whole call (pairs laid end to end), for stochastic
// rounding. Empty pairs are left out.
struct DtypeGroup {
  c10::ScalarType ema_dtype, src_dtype;
  std::vector<Entry> entries;
};

inline std::vector<DtypeGroup> group_by_dtype(at::TensorList ema, at::TensorList src) {
  std::vector<DtypeGroup> groups;
  int64_t base = 0;
  for (size_t i = 0; i < ema.size(); ++i) {
    const int64_t n = ema[i].numel();
    if (n > 0) {
      const auto e = ema[i].scalar_type(), s = src[i].scalar_type();
      auto g = std::find_if(groups.begin(), groups.end(),
                            [&](const DtypeGroup& x) { return x.ema_dtype == e && x.src_dtype == s; });
      if (g == groups.end())
        g = groups.insert(groups.end(), DtypeGroup{e, s, {}});
      g->entries.push_back(Entry{ema[i].data_ptr(), src[i].data_ptr(), n, base});
    }
    base += n;
  }
  return groups;
}

}  // namespace ema
}  // namespace opensora_fast
