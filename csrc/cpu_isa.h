// CPU kernels' loops are written once and compiled twice: for the baseline ISA
// and for AVX2+FMA+F16C, chosen at run time, so one build is fast on modern x86
// and still runs everywhere. Every op uses this one pattern:
//
//   template <typename T> struct SumSq {            // the loop, always inlined
//     static OSF_ALWAYS_INLINE float run(const T* p, int64_t n) { ... }
//   };
//   float s = cpu_isa::run<SumSq<T>>(p, n);         // AVX2 build when the CPU has it
#pragma once

#define OSF_ALWAYS_INLINE __attribute__((always_inline)) inline

#if defined(__x86_64__) && defined(__GNUC__)
#define OSF_AVX2_PATH 1
#define OSF_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace opensora_fast {

inline bool cpu_has_avx2() {
#ifdef OSF_AVX2_PATH
  static const bool yes =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return yes;
#else
  return false;
#endif
}

namespace cpu_isa {

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

template <typename Body, typename... A>
decltype(auto) run(A... a) {
#ifdef OSF_AVX2_PATH
  if (cpu_has_avx2())
    return avx2<Body>(a...);
#endif
  return baseline<Body>(a...);
}

}  // namespace cpu_isa
}  // namespace opensora_fast
