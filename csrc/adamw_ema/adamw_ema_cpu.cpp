// AdamW+EMA on the CPU: one parallel pass over every element of every entry,
// and the CPU walk over the CUDA launch grid (a test of the GPU geometry and
// indexing without a GPU).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../cpu_isa.h"
#include "../parallel_spans.h"

#if defined(OSF_AVX2_PATH) || defined(OSF_AVX512_PATH)
#include <immintrin.h>
#endif

#include "adamw_ema.h"
#include "adamw_ema_ops.h"

namespace opensora_fast {
namespace adamw_ema {

namespace {

enum Mode { kAdam, kAdamEma, kEmaOnly };

// The AdamW part of a span. Scalar here; gcc cannot vectorise sqrt while it
// must set errno (the build's default), so the AVX2 build below is written
// with intrinsics: the same operations in the same order as adamw_one.
template <bool Ams>
OSF_ALWAYS_INLINE void adam_scalar(float* __restrict p, const float* __restrict g, float* __restrict m,
                                   float* __restrict v, float* __restrict vm, const Hyper& h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float x = Ams ? vm[i] : 0.0f;
    adamw_one(p[i], g[i], m[i], v[i], x, h);
    if (Ams)
      vm[i] = x;
  }
}

#ifdef OSF_AVX2_PATH
template <bool Ams>
OSF_TARGET_AVX2 inline void adam_avx2(float* __restrict p, const float* __restrict g, float* __restrict m,
                                      float* __restrict v, float* __restrict vm, const Hyper& h, int64_t n) {
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(h.sign)));
  const __m256 wdf = _mm256_set1_ps(h.wd_factor), w = _mm256_set1_ps(h.lerp_w), b2 = _mm256_set1_ps(h.beta2);
  const __m256 sqw = _mm256_set1_ps(h.sq_w), bc2 = _mm256_set1_ps(h.bc2_sqrt), eps = _mm256_set1_ps(h.eps);
  const __m256 ss = _mm256_set1_ps(h.step_size);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_xor_ps(_mm256_loadu_ps(g + i), sign);
    const __m256 pv = _mm256_mul_ps(_mm256_loadu_ps(p + i), wdf);
    const __m256 mv0 = _mm256_loadu_ps(m + i);
    const __m256 diff = _mm256_sub_ps(gv, mv0);
    const __m256 mv = _mm256_fmadd_ps(w, diff, h.lerp_small ? mv0 : gv);
    const __m256 vv = _mm256_fmadd_ps(_mm256_mul_ps(sqw, gv), gv, _mm256_mul_ps(_mm256_loadu_ps(v + i), b2));
    __m256 s = vv;
    if (Ams) {  // maximum(a = vmax, b = v): a > b ? a : b, then NaN of b, then NaN of a
      const __m256 a = _mm256_loadu_ps(vm + i);
      __m256 r = _mm256_max_ps(a, vv);
      r = _mm256_blendv_ps(r, vv, _mm256_cmp_ps(vv, vv, _CMP_UNORD_Q));
      r = _mm256_blendv_ps(r, a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
      _mm256_storeu_ps(vm + i, r);
      s = r;
    }
    const __m256 d = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(s), bc2), eps);
    _mm256_storeu_ps(p + i, _mm256_add_ps(pv, _mm256_div_ps(_mm256_mul_ps(ss, mv), d)));
    _mm256_storeu_ps(m + i, mv);
    _mm256_storeu_ps(v + i, vv);
  }
  adam_scalar<Ams>(p + i, g + i, m + i, v + i, Ams ? vm + i : nullptr, h, n - i);
}
#endif

#ifdef OSF_AVX512_PATH
// adam_avx2 with 16 lanes: the same operations in the same order.
template <bool Ams>
OSF_TARGET_AVX512 inline void adam_avx512(float* __restrict p, const float* __restrict g, float* __restrict m,
                                          float* __restrict v, float* __restrict vm, const Hyper& h, int64_t n) {
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(h.sign));
  const __m512 wdf = _mm512_set1_ps(h.wd_factor), w = _mm512_set1_ps(h.lerp_w), b2 = _mm512_set1_ps(h.beta2);
  const __m512 sqw = _mm512_set1_ps(h.sq_w), bc2 = _mm512_set1_ps(h.bc2_sqrt), eps = _mm512_set1_ps(h.eps);
  const __m512 ss = _mm512_set1_ps(h.step_size);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 gv = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_loadu_ps(g + i)), sign));
    const __m512 pv = _mm512_mul_ps(_mm512_loadu_ps(p + i), wdf);
    const __m512 mv0 = _mm512_loadu_ps(m + i);
    const __m512 diff = _mm512_sub_ps(gv, mv0);
    const __m512 mv = _mm512_fmadd_ps(w, diff, h.lerp_small ? mv0 : gv);
    const __m512 vv = _mm512_fmadd_ps(_mm512_mul_ps(sqw, gv), gv, _mm512_mul_ps(_mm512_loadu_ps(v + i), b2));
    __m512 s = vv;
    if (Ams) {  // maximum(a = vmax, b = v): a > b ? a : b, then NaN of b, then NaN of a
      const __m512 a = _mm512_loadu_ps(vm + i);
      __m512 r = _mm512_max_ps(a, vv);
      r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(vv, vv, _CMP_UNORD_Q), r, vv);
      r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), r, a);
      _mm512_storeu_ps(vm + i, r);
      s = r;
    }
    const __m512 d = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(s), bc2), eps);
    _mm512_storeu_ps(p + i, _mm512_add_ps(pv, _mm512_div_ps(_mm512_mul_ps(ss, mv), d)));
    _mm512_storeu_ps(m + i, mv);
    _mm512_storeu_ps(v + i, vv);
  }
  adam_scalar<Ams>(p + i, g + i, m + i, v + i, Ams ? vm + i : nullptr, h, n - i);
}
#endif

// The AdamW block of ISA variant Isa.
template <int Isa, bool Ams>
OSF_ALWAYS_INLINE void adam_block(float* __restrict p, const float* __restrict g, float* __restrict m,
                                  float* __restrict v, float* __restrict vm, const Hyper& h, int64_t n) {
#ifdef OSF_AVX512_PATH
  if constexpr (Isa == cpu_isa::kAvx512)
    return adam_avx512<Ams>(p, g, m, v, vm, h, n);
#endif
#ifdef OSF_AVX2_PATH
  if constexpr (Isa == cpu_isa::kAvx2)
    return adam_avx2<Ams>(p, g, m, v, vm, h, n);
#endif
  adam_scalar<Ams>(p, g, m, v, vm, h, n);
}

template <typename E, bool Stoch>
OSF_ALWAYS_INLINE void ema_loop(E* __restrict e, const float* __restrict p, int64_t n, const Args& a, uint64_t base) {
  if (Stoch) {
    for (int64_t i = 0; i < n; ++i)
      e[i] = ema::ema_stochastic<E, float>(e[i], p[i], a.decay, a.alpha, a.seed, base + i);
  } else {
    const float d = a.decay, al = a.alpha;
    for (int64_t i = 0; i < n; ++i)
      e[i] = ema::ema_compat<E, float>(e[i], p[i], d, al);
  }
}

// Blocks small enough that the EMA re-reads the fresh masters from L1, not memory.
constexpr int64_t kBlock = 512;

template <typename E, bool Ams, bool Stoch, int M, int Isa>
OSF_ALWAYS_INLINE void span_body(const Entry& en, const Args& a, int64_t lo, int64_t n) {
  for (int64_t b = lo; b < lo + n; b += kBlock) {
    const int64_t len = std::min(kBlock, lo + n - b);
    if constexpr (M != kEmaOnly) {
      float* vm = Ams ? en.vmax + b : nullptr;
      adam_block<Isa, Ams>(en.p + b, en.g + b, en.m + b, en.v + b, vm, en.h, len);
    }
    if constexpr (M != kAdam)
      ema_loop<E, Stoch>(static_cast<E*>(en.ema) + b, en.p + b, len, a, static_cast<uint64_t>(en.ema_base + b));
  }
}

using SpanFn = void (*)(const Entry& en, const Args& a, int64_t lo, int64_t n);

// cpu_isa.h's builds, chosen at run time; the AVX2 and AVX-512 ones with the
// intrinsics AdamW blocks.
template <typename E, bool Ams, bool Stoch, int M>
void span_baseline(const Entry& en, const Args& a, int64_t lo, int64_t n) {
  span_body<E, Ams, Stoch, M, cpu_isa::kBaseline>(en, a, lo, n);
}

#ifdef OSF_AVX2_PATH
template <typename E, bool Ams, bool Stoch, int M>
OSF_TARGET_AVX2 void span_avx2(const Entry& en, const Args& a, int64_t lo, int64_t n) {
  span_body<E, Ams, Stoch, M, cpu_isa::kAvx2>(en, a, lo, n);
}
#endif

#ifdef OSF_AVX512_PATH
template <typename E, bool Ams, bool Stoch, int M>
OSF_TARGET_AVX512 void span_avx512(const Entry& en, const Args& a, int64_t lo, int64_t n) {
  span_body<E, Ams, Stoch, M, cpu_isa::kAvx512>(en, a, lo, n);
}
#endif

template <typename E, bool Ams, bool Stoch, int M>
SpanFn span_fn() {
  const int isa = cpu_isa::current();
#ifdef OSF_AVX512_PATH
  if (isa == cpu_isa::kAvx512)
    return &span_avx512<E, Ams, Stoch, M>;
#endif
#ifdef OSF_AVX2_PATH
  if (isa == cpu_isa::kAvx2)
    return &span_avx2<E, Ams, Stoch, M>;
#endif
  return &span_baseline<E, Ams, Stoch, M>;
}

template <typename E>
SpanFn pick(const Entry& en, bool stochastic) {
  if (en.g == nullptr)
    return stochastic ? span_fn<E, false, true, kEmaOnly>() : span_fn<E, false, false, kEmaOnly>();
  if (en.ema == nullptr)
    return en.h.amsgrad ? span_fn<float, true, false, kAdam>() : span_fn<float, false, false, kAdam>();
  if (en.h.amsgrad)
    return stochastic ? span_fn<E, true, true, kAdamEma>() : span_fn<E, true, false, kAdamEma>();
  return stochastic ? span_fn<E, false, true, kAdamEma>() : span_fn<E, false, false, kAdamEma>();
}

struct Job {
  const Entry* en;
  SpanFn fn;
  const Args* a;
};

constexpr int64_t kGrain = 32768;

void forward_cpu(const Call& c) {
  check_inputs(c);
  const std::vector<EntryGroup> groups = prepare(c);
  std::vector<Args> args(groups.size());
  std::vector<Job> jobs;
  std::vector<int64_t> start{0};  // entries laid end to end
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    dispatch_ema(groups[gi].ema_dtype, [&](auto et) {
      using E = typename decltype(et)::type;
      args[gi] = ema::make_params<E, float>(c.decay, c.stochastic, c.seed);
      for (const Entry& en : groups[gi].entries) {
        jobs.push_back(Job{&en, pick<E>(en, c.stochastic), &args[gi]});
        start.push_back(start.back() + en.numel);
      }
    });
  }
  // One parallel pass over all elements of all entries.
  for_each_span(start, kGrain,
                [&](size_t i, int64_t lo, int64_t hi) { jobs[i].fn(*jobs[i].en, *jobs[i].a, lo, hi - lo); });
}

template <typename Table>
void walk_group(const EntryGroup& g, const Call& c, int64_t max_entries, int64_t max_blocks) {
  dispatch_ema(g.ema_dtype, [&](auto et) {
    using E = typename decltype(et)::type;
    const Args a = ema::make_params<E, float>(c.decay, c.stochastic, c.seed);
    const auto tables = plan_launches<Table>(
        g.entries, [&](size_t i) { return blocks_of(g.entries[i]); }, TableLimits{max_entries, max_blocks});
    walk_grid<Body<E>>(tables, a, kThreads);
  });
}

// Same checks, planning and tables as the CUDA launcher, then every
// (block, thread) of every launch in turn, with the real block size.
void grid_walk(const Call& c, int64_t max_entries, int64_t max_blocks, bool small_table) {
  check_inputs(c);
  for (const EntryGroup& g : prepare(c)) {
    if (small_table)
      walk_group<SmallTable>(g, c, max_entries, max_blocks);
    else
      walk_group<BigTable>(g, c, max_entries, max_blocks);
  }
}

}  // namespace

}  // namespace adamw_ema
}  // namespace opensora_fast

TORCH_LIBRARY_IMPL(opensora_fast, CPU, m) {
  namespace aw = opensora_fast::adamw_ema;
  m.impl("adamw_ema_", &aw::as_op<&aw::forward_cpu>);
  m.impl("_adamw_ema_grid_walk_", &aw::as_walk_op<&aw::grid_walk>);
}
