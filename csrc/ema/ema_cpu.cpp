// EMA on the CPU: input checks shared with the CUDA path, the parallel CPU
// kernel, and the CPU walk over the CUDA launch grid.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "../cpu_isa.h"
#include "ema.h"
#include "ema_ops.h"

namespace opensora_fast {
namespace ema {

namespace {

bool supported_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::BFloat16 ||
         t == c10::ScalarType::Half;
}

// The elementwise loop over one contiguous span (cpu_isa.h: built twice; the
// AVX2 build vectorises and inlines std::fma as one instruction).
template <typename E, typename S>
OSF_ALWAYS_INLINE void span_body(E* e, const S* s, int64_t n, const Params& p,
                                                     uint64_t base) {
  if (p.stochastic) {
    for (int64_t i = 0; i < n; ++i)
      e[i] = ema_stochastic(e[i], s[i], p.decay, p.alpha, p.seed, base + i);
  } else {
    const float d = p.decay, a = p.alpha;
    for (int64_t i = 0; i < n; ++i) e[i] = ema_compat(e[i], s[i], d, a);
  }
}

template <typename E, typename S>
void span_baseline(E* e, const S* s, int64_t n, const Params& p, uint64_t base) {
  span_body(e, s, n, p, base);
}

#ifdef OSF_AVX2_PATH
template <typename E, typename S>
OSF_TARGET_AVX2 void span_avx2(E* e, const S* s, int64_t n, const Params& p, uint64_t base) {
  span_body(e, s, n, p, base);
}
#endif

using SpanFn = void (*)(void* e, const void* s, int64_t offset, int64_t n, const Params& p,
                        uint64_t base);

template <typename E, typename S>
void span(void* e, const void* s, int64_t offset, int64_t n, const Params& p, uint64_t base) {
  E* ep = static_cast<E*>(e) + offset;
  const S* sp = static_cast<const S*>(s) + offset;
#ifdef OSF_AVX2_PATH
  if (cpu_has_avx2()) return span_avx2(ep, sp, n, p, base + offset);
#endif
  span_baseline(ep, sp, n, p, base + offset);
}

struct Job {
  void* e;
  const void* s;
  SpanFn fn;
  Params p;
};

constexpr int64_t kGrain = 32768;

}  // namespace

void check_ema_inputs(at::TensorList ema, at::TensorList src, double decay) {
  TORCH_CHECK_VALUE(ema.size() == src.size(),
                    "ema_update_: ema and src must have the same length, got len(ema)=",
                    ema.size(), " and len(src)=", src.size());
  TORCH_CHECK_VALUE(decay >= 0.0 && decay <= 1.0, "ema_update_: decay must be in [0, 1], got ",
                    decay);
  for (size_t i = 0; i < ema.size(); ++i) {
    const at::Tensor& e = ema[i];
    const at::Tensor& s = src[i];
    TORCH_CHECK_VALUE(e.defined() && s.defined(), "ema_update_: ema[", i, "] or src[", i,
                      "] is undefined");
    TORCH_CHECK_TYPE(supported_dtype(e.scalar_type()), "ema_update_: ema[", i, "] has dtype ",
                     e.scalar_type(), "; expected float32, bfloat16 or float16");
    TORCH_CHECK_TYPE(supported_dtype(s.scalar_type()), "ema_update_: src[", i, "] has dtype ",
                     s.scalar_type(), "; expected float32, bfloat16 or float16");
    TORCH_CHECK_VALUE(e.sizes() == s.sizes(), "ema_update_: ema[", i, "] has shape ", e.sizes(),
                      " but src[", i, "] has shape ", s.sizes());
    TORCH_CHECK_VALUE(e.layout() == at::kStrided && s.layout() == at::kStrided,
                      "ema_update_: ema[", i, "] and src[", i, "] must be dense (strided) tensors");
    TORCH_CHECK_VALUE(e.device() == s.device(), "ema_update_: ema[", i, "] is on ", e.device(),
                      " but src[", i, "] is on ", s.device());
    TORCH_CHECK_VALUE(e.device() == ema[0].device(), "ema_update_: all pairs must be on one device; ema[0] is on ",
                      ema[0].device(), " but ema[", i, "] is on ", e.device());
    TORCH_CHECK_VALUE(e.is_contiguous(), "ema_update_: ema[", i, "] is not contiguous");
    TORCH_CHECK_VALUE(s.is_contiguous(), "ema_update_: src[", i, "] is not contiguous");
  }
}

void ema_update_cpu(at::TensorList ema, at::TensorList src, double decay, bool stochastic,
                    int64_t seed) {
  const size_t n = ema.size();
  std::vector<int64_t> start(n + 1, 0);  // pairs laid end to end
  std::vector<Job> jobs(n);
  for (size_t i = 0; i < n; ++i) {
    start[i + 1] = start[i] + ema[i].numel();
    dispatch_pair(ema[i].scalar_type(), src[i].scalar_type(), [&](auto et, auto st) {
      using E = typename decltype(et)::type;
      using S = typename decltype(st)::type;
      jobs[i] = Job{ema[i].data_ptr(), src[i].data_ptr(), &span<E, S>,
                    make_params<E, S>(decay, stochastic, seed)};
    });
  }
  if (start[n] == 0) return;
  // One parallel pass over all elements of all pairs; a task may span pairs.
  at::parallel_for(0, start[n], kGrain, [&](int64_t begin, int64_t end) {
    size_t i = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (; i < n && start[i] < end; ++i) {
      const int64_t lo = std::max(begin, start[i]) - start[i];
      const int64_t hi = std::min(end, start[i + 1]) - start[i];
      if (hi > lo) jobs[i].fn(jobs[i].e, jobs[i].s, lo, hi - lo, jobs[i].p, start[i]);
    }
  });
}

void ema_grid_walk_cpu(at::TensorList ema, at::TensorList src, double decay, bool stochastic,
                       int64_t seed, int64_t max_tensors, int64_t max_blocks) {
  // Same grouping and planning as ema_update_cuda, then every (block, thread)
  // of every launch in turn, with the real block size.
  for (const DtypeGroup& g : group_by_dtype(ema, src)) {
    dispatch_pair(g.ema_dtype, g.src_dtype, [&](auto et, auto st) {
      using E = typename decltype(et)::type;
      using S = typename decltype(st)::type;
      const Params p = make_params<E, S>(decay, stochastic, seed);
      for (const LaunchTable& tab : plan_launches(g.ema, g.src, g.numel, g.index_base,
                                                  static_cast<int>(max_tensors),
                                                  static_cast<int>(max_blocks)))
        for (int b = 0; b < tab.n_blocks; ++b)
          for (int t = 0; t < kThreads; ++t) ema_block_body<E, S>(tab, p, b, t, kThreads);
    });
  }
}

}  // namespace ema
}  // namespace opensora_fast
