// CPU kernels' loops are written once (an always-inline body) and compiled
// twice: for the baseline ISA and for AVX2+FMA+F16C, chosen at run time, so one
// build is fast on modern x86 and still runs everywhere.
#pragma once

#define OSF_ALWAYS_INLINE __attribute__((always_inline)) inline

#if defined(__x86_64__) && defined(__GNUC__)
#define OSF_AVX2_PATH 1
#define OSF_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace opensora_fast {
inline bool cpu_has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return yes;
}
}  // namespace opensora_fast
#endif
