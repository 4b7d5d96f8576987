// Unpad on the CPU: the parallel copy kernel, and the CPU walk over the CUDA
// launch grid (a test of the GPU geometry and indexing without a GPU).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../parallel_spans.h"
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
    for (int64_t r = 0; r < p.rows[i]; ++r) {  // the rows past p.rows[i] are padding only
      const int64_t n = row_valid(e, r);
      const int64_t j = r * e.shard + e.begin;  // < numel: row r has data
      segs.push_back(Segment{base + (r * p.bucket + e.offset) * p.unit, static_cast<char*>(e.dst) + j * p.unit});
      start.push_back(start.back() + n * p.unit);
    }
  }
  // One parallel pass over all bytes of all segments.
  for_each_span(start, kGrainBytes, [&](size_t s, int64_t a, int64_t b) {
    std::memcpy(segs[s].dst + a, segs[s].src + a, static_cast<size_t>(b - a));
  });
}

template <typename Table>
void walk_tables(const Plan& p, const void* gathered, TableLimits lim) {
  dispatch_unit(p.unit, [&](auto u) {
    using U = decltype(u);
    walk_grid<Body<U>>(plan_tables<Table>(p, lim), Args{gathered, p.bucket}, kThreads);
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
  const TableLimits lim{max_entries, max_blocks};
  if (small_table)
    walk_tables<SmallTable>(p, g, lim);
  else
    walk_tables<BigTable>(p, g, lim);
}

}  // namespace

}  // namespace unpad
}  // namespace opensora_fast

TORCH_LIBRARY_IMPL(opensora_fast, CPU, m) {
  m.impl("unpad_", &opensora_fast::unpad::forward_cpu);
  m.impl("_unpad_grid_walk", &opensora_fast::unpad::grid_walk);
}
