// The CPU forward's per-thread sums (partial_thread_sum for all kThreads
// threads of a block at once) over whole rounds of kThreads groups, with
// explicit AVX2 / AVX-512 registers: vector lanes are GPU threads.
//
// A thread's group is V = 16 / sizeof(T) consecutive elements: 16 bytes, one
// 128-bit lane of a register. A register of NL 128-bit lanes loaded at group
// g holds the groups of threads g .. g+NL-1; four such loads (fp64: two),
// transposed within each 128-bit lane, give one register per k (a group's
// k-th element) across the set's threads, so each lane adds its thread's
// elements in the order partial_thread_sum does: the same sums, bit for bit.
// Register element Q*L + q belongs to thread NL*q + L of its set (Q = 4, fp64
// 2); unpermute() puts them back in thread order.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "../cpu_isa.h"
#include "masked_mse.h"

#if defined(OSF_AVX2_PATH) || defined(OSF_AVX512_PATH)
#include <immintrin.h>

namespace opensora_fast {
namespace masked_mse {
namespace simd {

// Register traits: F (fp32), D (fp64), NL 128-bit lanes; bf16 / fp16 loads
// widen one register of groups into (k 0..3, k 4..7) per 128-bit lane.
#define OSF_W512 __attribute__((always_inline)) inline OSF_TARGET_AVX512
struct W512 {
  using F = __m512;
  using D = __m512d;
  static constexpr int NL = 4;
  static OSF_W512 F sub(const float* p, const float* t) {
    return _mm512_sub_ps(_mm512_loadu_ps(p), _mm512_loadu_ps(t));
  }
  static OSF_W512 D sub(const double* p, const double* t) {
    return _mm512_sub_pd(_mm512_loadu_pd(p), _mm512_loadu_pd(t));
  }
  static OSF_W512 void widen(const c10::BFloat16* p, F* lo, F* hi) {
    const __m512i x = _mm512_loadu_si512(p), z = _mm512_setzero_si512();
    *lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(z, x));
    *hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(z, x));
  }
  static OSF_W512 void widen(const c10::Half* p, F* lo, F* hi) {  // exact: every fp16 is an fp32
    const __m512i q = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), _mm512_loadu_si512(p));
    *lo = _mm512_cvtph_ps(_mm512_castsi512_si256(q));
    *hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(q, 1));
  }
  static OSF_W512 F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static OSF_W512 F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static OSF_W512 D fma(D a, D b, D c) { return _mm512_fmadd_pd(a, b, c); }
  static OSF_W512 F lo32(F a, F b) { return _mm512_unpacklo_ps(a, b); }
  static OSF_W512 F hi32(F a, F b) { return _mm512_unpackhi_ps(a, b); }
  static OSF_W512 F lo64(F a, F b) {
    return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  }
  static OSF_W512 F hi64(F a, F b) {
    return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  }
  static OSF_W512 D lo64(D a, D b) { return _mm512_unpacklo_pd(a, b); }
  static OSF_W512 D hi64(D a, D b) { return _mm512_unpackhi_pd(a, b); }
  static OSF_W512 F load(const float* p) { return _mm512_loadu_ps(p); }
  static OSF_W512 D load(const double* p) { return _mm512_loadu_pd(p); }
  static OSF_W512 void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static OSF_W512 void store(double* p, D v) { _mm512_storeu_pd(p, v); }
};
#undef OSF_W512

#define OSF_W256 __attribute__((always_inline)) inline OSF_TARGET_AVX2
struct W256 {
  using F = __m256;
  using D = __m256d;
  static constexpr int NL = 2;
  static OSF_W256 F sub(const float* p, const float* t) {
    return _mm256_sub_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(t));
  }
  static OSF_W256 D sub(const double* p, const double* t) {
    return _mm256_sub_pd(_mm256_loadu_pd(p), _mm256_loadu_pd(t));
  }
  static OSF_W256 void widen(const c10::BFloat16* p, F* lo, F* hi) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), z = _mm256_setzero_si256();
    *lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, x));
    *hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, x));
  }
  static OSF_W256 void widen(const c10::Half* p, F* lo, F* hi) {  // exact: every fp16 is an fp32
    const __m256i q = _mm256_permute4x64_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), 0xD8);
    *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(q));
    *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(q, 1));
  }
  static OSF_W256 F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static OSF_W256 F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static OSF_W256 D fma(D a, D b, D c) { return _mm256_fmadd_pd(a, b, c); }
  static OSF_W256 F lo32(F a, F b) { return _mm256_unpacklo_ps(a, b); }
  static OSF_W256 F hi32(F a, F b) { return _mm256_unpackhi_ps(a, b); }
  static OSF_W256 F lo64(F a, F b) {
    return _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(a), _mm256_castps_pd(b)));
  }
  static OSF_W256 F hi64(F a, F b) {
    return _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(a), _mm256_castps_pd(b)));
  }
  static OSF_W256 D lo64(D a, D b) { return _mm256_unpacklo_pd(a, b); }
  static OSF_W256 D hi64(D a, D b) { return _mm256_unpackhi_pd(a, b); }
  static OSF_W256 F load(const float* p) { return _mm256_loadu_ps(p); }
  static OSF_W256 D load(const double* p) { return _mm256_loadu_pd(p); }
  static OSF_W256 void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static OSF_W256 void store(double* p, D v) { _mm256_storeu_pd(p, v); }
};
#undef OSF_W256

// Register order back to thread order (see the top).
template <typename A, int NL>
inline void unpermute(const A* buf, A* acc) {
  constexpr int Q = std::is_same<A, double>::value ? 2 : 4;
  for (int base = 0; base < kThreads; base += Q * NL)
    for (int L = 0; L < NL; ++L)
      for (int q = 0; q < Q; ++q)
        acc[base + NL * q + L] = buf[base + Q * L + q];
}

#ifdef OSF_AVX512_PATH
#define OSF_SIMD_TARGET OSF_TARGET_AVX512
#define OSF_SIMD_W W512
#define OSF_SIMD_NS avx512
#include "masked_mse_rounds.h"
#endif

#ifdef OSF_AVX2_PATH
#define OSF_SIMD_TARGET OSF_TARGET_AVX2
#define OSF_SIMD_W W256
#define OSF_SIMD_NS avx2
#include "masked_mse_rounds.h"
#endif

}  // namespace simd
}  // namespace masked_mse
}  // namespace opensora_fast

#endif
