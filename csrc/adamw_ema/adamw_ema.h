// Fused multi-tensor AdamW over fp32 masters that also steps an EMA twin of
// each master from the freshly updated value, in the same pass.
//
// This header is the single source of the arithmetic (adamw_one, the EMA op's
// ema_one) and of the GPU launch geometry (Entry, Body over the shared launch
// core multi_tensor.h). The CPU kernel runs the same scalar functions; the
// CUDA kernel runs Body, which the CPU test op _adamw_ema_grid_walk_ walks.
#pragma once

#include <cstdint>

#include "../common.h"
#include "../ema/ema.h"
#include "../multi_tensor.h"

namespace opensora_fast {
namespace adamw_ema {

// The step is inlined into the CPU loops (so they vectorise) as into the GPU body.
#if defined(__CUDACC__)
#define OSF_AW_INLINE OSF_INLINE
#else
#define OSF_AW_INLINE __attribute__((always_inline)) inline
#endif

// Rounded fp32 operations, spelled out so that nvcc (--fmad) cannot contract
// them; the CPU build has -ffp-contract=off.
OSF_INLINE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

OSF_INLINE float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

OSF_INLINE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

OSF_INLINE float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);
#endif
}

// torch.maximum: NaN if either is NaN.
OSF_INLINE float maximum(float a, float b) {
  const float m = a > b ? a : b;
  return (a != a) ? a : ((b != b) ? b : m);
}

// Per-tensor constants, computed on the host in double exactly as torch's
// foreach AdamW computes its Python scalars, then rounded to fp32 as its
// kernels round them.
struct Hyper {
  float wd_factor;  // 1 - lr * weight_decay
  float lerp_w;     // torch's lerp coefficient: w = 1 - beta1 when w < 0.5, else w - 1
  float beta2;
  float sq_w;      // 1 - beta2
  float bc2_sqrt;  // sqrt(1 - beta2^step)
  float eps;
  float step_size;  // -lr / (1 - beta1^step)
  uint32_t sign;    // 0x80000000 with maximize (the gradient's sign flipped), else 0
  uint8_t lerp_small;
  uint8_t amsgrad;
};

// One AdamW step of one element, the operation order of torch's foreach
// AdamW on the CPU (bit for bit, tests/test_adamw_ema.py):
//   p *= 1 - lr*wd;  m = lerp(m, g, 1 - beta1)  (torch's vectorised lerp: one fma);
//   v = fma((1 - beta2) * g, g, v * beta2);  vmax = max(vmax, v) (amsgrad);
//   p += (step_size * m) / (sqrt(v or vmax) / bc2_sqrt + eps)
OSF_AW_INLINE void adamw_one(float& p, float g, float& m, float& v, float& vmax, const Hyper& h) {
  g = f32_from_bits(f32_bits(g) ^ h.sign);
  p = mul_rn(p, h.wd_factor);
  const float diff = sub_rn(g, m);
  m = fma_rn(h.lerp_w, diff, h.lerp_small ? m : g);
  v = fma_rn(mul_rn(h.sq_w, g), g, mul_rn(v, h.beta2));
  float s = v;
  if (h.amsgrad) {
    vmax = maximum(vmax, v);
    s = vmax;
  }
  const float d = add_rn(div_rn(sqrt_rn(s), h.bc2_sqrt), h.eps);
  p = add_rn(p, div_rn(mul_rn(h.step_size, m), d));
}

// What one tensor of the call needs. g == nullptr: an EMA-only pair (its
// source p is read, not updated); ema == nullptr: no EMA twin.
struct Entry {
  float* p;
  const float* g;
  float* m;
  float* v;
  float* vmax;  // amsgrad only
  void* ema;    // dtype: the table's E
  int64_t numel;
  int64_t ema_base;  // stochastic rounding index of element 0 (EMA pairs laid end to end)
  Hyper h;
};

using Args = ema::Params;

constexpr int64_t kChunk = 32768;  // elements per block; a multiple of the vector width
constexpr int kThreads = 512;
constexpr int kVec = 4;  // 16-byte fp32 accesses
static_assert(kChunk % kVec == 0, "kChunk: whole vectors");

// Big tables use up to 32 KiB of kernel arguments (CUDA >= 12.1), small ones
// the classic 4 KiB (multi_tensor_cuda.cuh picks).
using BigTable = LaunchTable<Entry, 160, 2048>;
using SmallTable = LaunchTable<Entry, 16, 360>;
static_assert(sizeof(BigTable) + sizeof(Args) <= 32000, "kernel arguments over 32 KiB");
static_assert(sizeof(SmallTable) + sizeof(Args) <= 4000, "kernel arguments over 4 KiB");

inline int64_t blocks_of(const Entry& e) {
  return ceil_div<int64_t>(e.numel, kChunk);
}

// One element of an entry: the AdamW step (when it has a gradient), then the
// EMA from the fresh master (when it has a twin).
template <typename E>
OSF_INLINE void element(const Entry& en, const Args& a, float* p, const float* g, float* m, float* v, float* vm, E* e,
                        int64_t i, uint64_t index) {
  float pv = p[i];
  if (g != nullptr) {
    float mv = m[i], vv = v[i], vmv = vm != nullptr ? vm[i] : 0.0f;
    adamw_one(pv, g[i], mv, vv, vmv, en.h);
    p[i] = pv;
    m[i] = mv;
    v[i] = vv;
    if (vm != nullptr)
      vm[i] = vmv;
  }
  if (e != nullptr)
    e[i] = ema::ema_one<E, float>(e[i], pv, a, index);
}

template <typename T>
OSF_INLINE bool aligned_to(const T* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

// What thread `thread` of block `block` does. The math is elementwise, so the
// access width (kVec-element vectors when every pointer is aligned, single
// elements otherwise) never changes a result.
template <typename E>
struct Body {
  template <typename Table>
  static OSF_HOST_DEVICE void run(const Table& tab, const Args& a, int block, int /*y*/, int thread, int nthreads) {
    const Entry& en = tab.entry[tab.block_entry[block]];
    const int64_t lo = static_cast<int64_t>(tab.block_chunk[block]) * kChunk;
    const int64_t n = (en.numel - lo < kChunk) ? en.numel - lo : kChunk;
    float* p = en.p + lo;
    const float* g = en.g != nullptr ? en.g + lo : nullptr;
    float* m = g != nullptr ? en.m + lo : nullptr;
    float* v = g != nullptr ? en.v + lo : nullptr;
    float* vm = (g != nullptr && en.vmax != nullptr) ? en.vmax + lo : nullptr;
    E* e = en.ema != nullptr ? static_cast<E*>(en.ema) + lo : nullptr;
    const uint64_t base = static_cast<uint64_t>(en.ema_base + lo);

    // lo is a multiple of kVec, so the chunk is aligned exactly when the tensors are.
    constexpr int64_t fb = sizeof(float) * kVec;
    const bool aligned = aligned_to(p, fb) &&
                         (g == nullptr || (aligned_to(g, fb) && aligned_to(m, fb) && aligned_to(v, fb) &&
                                           (vm == nullptr || aligned_to(vm, fb)))) &&
                         (e == nullptr || aligned_to(e, static_cast<int64_t>(sizeof(E)) * kVec));
    int64_t done = 0;
    if (aligned) {
      using FV = VecN<float, kVec>;
      using EV = VecN<E, kVec>;
      const int64_t nvec = n / kVec;
      for (int64_t k = thread; k < nvec; k += nthreads) {
        FV pv = reinterpret_cast<const FV*>(p)[k];
        if (g != nullptr) {
          const FV gv = reinterpret_cast<const FV*>(g)[k];
          FV mv = reinterpret_cast<const FV*>(m)[k];
          FV vv = reinterpret_cast<const FV*>(v)[k];
          FV xv{};
          if (vm != nullptr)
            xv = reinterpret_cast<const FV*>(vm)[k];
          OSF_UNROLL
          for (int j = 0; j < kVec; ++j)
            adamw_one(pv.v[j], gv.v[j], mv.v[j], vv.v[j], xv.v[j], en.h);
          reinterpret_cast<FV*>(p)[k] = pv;
          reinterpret_cast<FV*>(m)[k] = mv;
          reinterpret_cast<FV*>(v)[k] = vv;
          if (vm != nullptr)
            reinterpret_cast<FV*>(vm)[k] = xv;
        }
        if (e != nullptr) {
          EV ev = reinterpret_cast<const EV*>(e)[k];
          OSF_UNROLL
          for (int j = 0; j < kVec; ++j)
            ev.v[j] = ema::ema_one<E, float>(ev.v[j], pv.v[j], a, base + k * kVec + j);
          reinterpret_cast<EV*>(e)[k] = ev;
        }
      }
      done = nvec * kVec;
    }
    for (int64_t i = done + thread; i < n; i += nthreads)
      element<E>(en, a, p, g, m, v, vm, e, i, base + i);
  }
};

// Calls f(Tag<E>{}) for an EMA dtype (fp32, bf16, fp16; check_inputs refused the rest).
template <typename F>
inline void dispatch_ema(c10::ScalarType t, F&& f) {
  switch (t) {
    case c10::ScalarType::Float:
      return f(Tag<float>{});
    case c10::ScalarType::BFloat16:
      return f(Tag<c10::BFloat16>{});
    case c10::ScalarType::Half:
      return f(Tag<c10::Half>{});
    default:
      TORCH_CHECK(false, "adamw_ema_: unsupported ema dtype ", t);
  }
}

}  // namespace adamw_ema
}  // namespace opensora_fast
