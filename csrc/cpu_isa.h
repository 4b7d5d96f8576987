// CPU kernels' loops are written once and compiled three times: for the
// baseline ISA, for AVX2+FMA+F16C and for AVX-512 (F/BW/VL/DQ, 512-bit vectors),
// the widest the CPU has chosen at run time, so one build is fast on modern x86
// and still runs everywhere. Every op uses this one pattern:
//
//   template <typename T> struct SumSq {            // the loop, always inlined
//     static OSF_ALWAYS_INLINE float run(const T* p, int64_t n) { ... }
//   };
//   float s = cpu_isa::run<SumSq<T>>(p, n);         // widest build the CPU has
//
// The builds compute the same IEEE operations in the same order (no fast-math,
// -ffp-contract=off, explicit fma), so every variant gives the same bits;
// tests force each one with the private op _cpu_isa (or, for a whole process,
// OPENSORA_FAST_CPU_ISA=baseline|avx2|avx512, read once; a variant the CPU
// lacks falls back to the widest it has).
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>

#define OSF_ALWAYS_INLINE __attribute__((always_inline)) inline

#if defined(__x86_64__) && defined(__GNUC__)
#define OSF_AVX2_PATH 1
#define OSF_AVX512_PATH 1
#define OSF_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#if defined(__clang__)
#define OSF_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"), min_vector_width(512)))
#else
#define OSF_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")))
#endif
#endif

namespace opensora_fast {
namespace cpu_isa {

enum Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* name(int isa) {
  return isa == kAvx512 ? "avx512" : isa == kAvx2 ? "avx2" : "baseline";
}

// -1 when `s` names no variant.
inline int parse(const char* s) {
  for (int i = kBaseline; i <= kAvx512; ++i)
    if (std::strcmp(s, name(i)) == 0)
      return i;
  return -1;
}

// The widest variant this CPU runs.
inline int best() {
  static const int isa = [] {
#ifdef OSF_AVX512_PATH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return static_cast<int>(kAvx512);
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return static_cast<int>(kAvx2);
#endif
    return static_cast<int>(kBaseline);
  }();
  return isa;
}

// The variant in use: best(), lowered by OPENSORA_FAST_CPU_ISA (read on first
// use; an unknown value is ignored) or by set() (the private op).
inline std::atomic<int>& state() {
  static std::atomic<int> isa{[] {
    const char* env = std::getenv("OPENSORA_FAST_CPU_ISA");
    const int want = env != nullptr ? parse(env) : -1;
    return want >= 0 && want < best() ? want : best();
  }()};
  return isa;
}

inline int current() {
  return state().load(std::memory_order_relaxed);
}

// Forces variant `isa` (<= best(): the caller checked); returns the previous one.
inline int set(int isa) {
  return state().exchange(isa);
}

// Body::run must be OSF_ALWAYS_INLINE: it is inlined into each ISA variant
// below, so the compiler vectorises it once per target.
template <typename Body, typename... A>
decltype(auto) baseline(A... a) {
  return Body::run(a...);
}

#ifdef OSF_AVX2_PATH
template <typename Body, typename... A>
OSF_TARGET_AVX2 decltype(auto) avx2(A... a) {
  return Body::run(a...);
}
#endif

#ifdef OSF_AVX512_PATH
template <typename Body, typename... A>
OSF_TARGET_AVX512 decltype(auto) avx512(A... a) {
  return Body::run(a...);
}
#endif

template <typename Body, typename... A>
decltype(auto) run(A... a) {
  const int isa = current();
#ifdef OSF_AVX512_PATH
  if (isa == kAvx512)
    return avx512<Body>(a...);
#endif
#ifdef OSF_AVX2_PATH
  if (isa == kAvx2)
    return avx2<Body>(a...);
#endif
  return baseline<Body>(a...);
}

}  // namespace cpu_isa

// Whether the CPU kernels run an AVX2 (or wider) build.
inline bool cpu_has_avx2() {
  return cpu_isa::current() >= cpu_isa::kAvx2;
}

}  // namespace opensora_fast
