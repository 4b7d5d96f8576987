// The CPU kernels' one parallel pass: items (tensors, row segments, plane runs)
// laid end to end, split into tasks of about `grain` units by
// at::parallel_for; a task may span items.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace opensora_fast {

// start: the items' offsets, start[0] = 0, one more than there are items
// (start[i + 1] - start[i]: the size of item i). Calls fn(i, lo, hi) for every
// non-empty part [lo, hi) of item i (offsets within the item).
template <typename F>
inline void for_each_span(const std::vector<int64_t>& start, int64_t grain, F&& fn) {
  const size_t n = start.size() - 1;
  if (start[n] == 0)
    return;
  at::parallel_for(0, start[n], grain, [&](int64_t begin, int64_t end) {
    size_t i = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (; i < n && start[i] < end; ++i) {
      const int64_t lo = std::max(begin, start[i]) - start[i];
      const int64_t hi = std::min(end, start[i + 1]) - start[i];
      if (hi > lo)
        fn(i, lo, hi);
    }
  });
}

}  // namespace opensora_fast
