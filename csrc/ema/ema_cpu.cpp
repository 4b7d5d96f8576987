// EMA on the CPU: the parallel kernel, and the CPU walk over the CUDA launch
// grid (a test of the GPU geometry and indexing without a GPU).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../cpu_isa.h"
#include "../parallel_spans.h"
#include "ema.h"
#include "ema_ops.h"

namespace opensora_fast {
namespace ema {

namespace {

// The elementwise loop over one contiguous span (cpu_isa.h: built twice; the
// AVX2 build vectorises and inlines std::fma as one instruction).
template <typename E, typename S>
struct Span {
  static OSF_ALWAYS_INLINE void run(E* e, const S* s, int64_t n, Params p, uint64_t base) {
    if (p.stochastic) {
      for (int64_t i = 0; i < n; ++i)
        e[i] = ema_stochastic(e[i], s[i], p.decay, p.alpha, p.seed, base + i);
    } else {
      const float d = p.decay, a = p.alpha;
      for (int64_t i = 0; i < n; ++i)
        e[i] = ema_compat(e[i], s[i], d, a);
    }
  }
};

using SpanFn = void (*)(void* e, const void* s, int64_t offset, int64_t n, const Params& p, uint64_t base);

template <typename E, typename S>
void span(void* e, const void* s, int64_t offset, int64_t n, const Params& p, uint64_t base) {
  cpu_isa::run<Span<E, S>>(static_cast<E*>(e) + offset, static_cast<const S*>(s) + offset, n, p, base + offset);
}

struct Job {
  void* e;
  const void* s;
  SpanFn fn;
  Params p;
};

constexpr int64_t kGrain = 32768;

void run_cpu(at::TensorList ema, at::TensorList src, double decay, bool stochastic, int64_t seed) {
  const size_t n = ema.size();
  std::vector<int64_t> start(n + 1, 0);  // pairs laid end to end
  std::vector<Job> jobs(n);
  for (size_t i = 0; i < n; ++i) {
    start[i + 1] = start[i] + ema[i].numel();
    dispatch_pair(ema[i].scalar_type(), src[i].scalar_type(), [&](auto et, auto st) {
      using E = typename decltype(et)::type;
      using S = typename decltype(st)::type;
      jobs[i] = Job{ema[i].data_ptr(), src[i].data_ptr(), &span<E, S>, make_params<E, S>(decay, stochastic, seed)};
    });
  }
  // One parallel pass over all elements of all pairs.
  for_each_span(start, kGrain, [&](size_t i, int64_t lo, int64_t hi) {
    jobs[i].fn(jobs[i].e, jobs[i].s, lo, hi - lo, jobs[i].p, start[i]);
  });
}

void forward_cpu(at::TensorList ema, at::TensorList src, double decay, bool stochastic, int64_t seed) {
  check_inputs(ema, src, decay);
  run_cpu(ema, src, decay, stochastic, seed);
}

[[maybe_unused]] const bool registered = set_runner(c10::DeviceType::CPU, &run_cpu);

// The persistent grid a walk emulates when the test names none: an H100's 132
// SMs x kMinBlocks resident blocks.
constexpr int64_t kWalkGrid = 132 * kMinBlocks;

template <typename Table>
void walk_group(const DtypeGroup& g, double decay, bool stochastic, int64_t seed, int64_t max_tensors, int64_t grid) {
  dispatch_pair(g.ema_dtype, g.src_dtype, [&](auto et, auto st) {
    using E = typename decltype(et)::type;
    using S = typename decltype(st)::type;
    const auto tables = plan<Table>(g.entries, max_tensors);
    const Params p = make_params<E, S>(decay, stochastic, seed);
    if (p.stochastic)
      walk_strided<Body<E, S, true>>(tables, p, kThreads, grid);
    else
      walk_strided<Body<E, S, false>>(tables, p, kThreads, grid);
  });
}

// Same grouping and planning as forward_cuda, then every (block, thread) of
// every launch's persistent grid in turn, with the real block size.
// max_tensors: entries per table (0: the table's own); max_blocks: the
// resident blocks the grid is capped at (0: kWalkGrid).
void grid_walk(at::TensorList ema, at::TensorList src, double decay, bool stochastic, int64_t seed, int64_t max_tensors,
               int64_t max_blocks, bool small_table) {
  check_inputs(ema, src, decay);
  const int64_t grid = max_blocks > 0 ? max_blocks : kWalkGrid;
  for (const DtypeGroup& g : group_by_dtype(ema, src)) {
    if (small_table)
      walk_group<SmallTable>(g, decay, stochastic, seed, max_tensors, grid);
    else
      walk_group<BigTable>(g, decay, stochastic, seed, max_tensors, grid);
  }
}

}  // namespace

}  // namespace ema
}  // namespace opensora_fast

TORCH_LIBRARY_IMPL(opensora_fast, CPU, m) {
  m.impl("ema_update_", &opensora_fast::ema::forward_cpu);
  m.impl("_ema_update_grid_walk_", &opensora_fast::ema::grid_walk);
}
