// Unpad on the CPU: the parallel copy kernel, and the CPU walk over the CUDA
// launch grid (a test of the GPU geometry and indexing without a GPU).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "unpad.h"
#include "unpad_ops.h"

namespace opensora_fast {
namespace unpad {

namespace {

// One row segment: the valid prefix of row r of an entry, a contiguous run in
// both gathered and the destination (unpad.h row_valid).
struct Segment {
  const char* src;
  char* dst;
};

constexpr int64_t kGrainBytes = 1 << 20;

void forward_cpu(const at::Tensor& gathered, at::TensorList out, at::IntArrayRef offset, at::IntArrayRef shard,
                 at::IntArrayRef begin, at::IntArrayRef count) {
  check_inputs(gathered, out, offset, shard, begin, count);
  const Plan p = make_plan(gathered, out, offset, shard, begin, count);
  const char* base = static_cast<const char*>(gathered.numel() ? gathered.data_ptr() : nullptr);
  std::vector<Segment> segs;
  std::vector<int64_t> start{0};  // byte offsets, segments laid end to end
  for (size_t i = 0; i < p.entries.size(); ++i) {
    const Entry& e = p.entries[i];
    for (int64_t r = 0; r < e.rows; ++r) {  // the rows past e.rows are padding only
      const int64_t n = row_valid(e, r);
      const int64_t j = r * e.shard + e.begin;  // < numel: row r has data
      segs.push_back(Segment{base + (r * p.bucket + e.offset) * p.unit, static_cast<char*>(p.dst[i]) + j * p.unit});
      start.push_back(start.back() + n * p.unit);
    }
  }
  if (start.back() == 0) return;
  // One parallel pass over all bytes of all segments; a task may span segments.
  at::parallel_for(0, start.back(), kGrainBytes, [&](int64_t lo, int64_t hi) {
    size_t s = std::upper_bound(start.begin(), start.end(), lo) - start.begin() - 1;
    for (; s < segs.size() && start[s] < hi; ++s) {
      const int64_t a = std::max(lo, start[s]) - start[s];
      const int64_t b = std::min(hi, start[s + 1]) - start[s];
      if (b > a) std::memcpy(segs[s].dst + a, segs[s].src + a, static_cast<size_t>(b - a));
    }
  });
}

template <typename Table>
void walk_tables(const Plan& p, const void* gathered, int64_t max_entries, int64_t max_blocks) {
  dispatch_unit(p.unit, [&](auto u) {
    using U = decltype(u);
    for (const Table& tab :
         plan_launches<Table>(p.dst, p.entries, static_cast<int>(max_entries), static_cast<int>(max_blocks)))
      for (int b = 0; b < tab.n_blocks; ++b)
        for (int t = 0; t < kThreads; ++t)
          unpad_block_body<U>(tab, static_cast<const U*>(gathered), p.bucket, b, t, kThreads);
  });
}

// Same planning as forward_cuda, then every (block, thread) of every launch
// in turn, with the real block size.
void grid_walk(const at::Tensor& gathered, at::TensorList out, at::IntArrayRef offset, at::IntArrayRef shard,
               at::IntArrayRef begin, at::IntArrayRef count, int64_t max_entries, int64_t max_blocks,
               bool small_table) {
  check_inputs(gathered, out, offset, shard, begin, count);
  const Plan p = make_plan(gathered, out, offset, shard, begin, count);
  const void* g = gathered.numel() ? gathered.data_ptr() : nullptr;
  if (small_table)
    walk_tables<SmallTable>(p, g, max_entries, max_blocks);
  else
    walk_tables<BigTable>(p, g, max_entries, max_blocks);
}

}  // namespace

}  // namespace unpad
}  // namespace opensora_fast

TORCH_LIBRARY_IMPL(opensora_fast, CPU, m) {
  m.impl("unpad_", &opensora_fast::unpad::forward_cpu);
  m.impl("_unpad_grid_walk", &opensora_fast::unpad::grid_walk);
}
