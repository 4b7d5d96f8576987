// Shared by every op: host/device qualifiers and small helpers. Kept free of
// torch/extension.h so that .cu files stay cheap to compile.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define OSF_HOST_DEVICE __host__ __device__
#define OSF_INLINE __host__ __device__ __forceinline__
#define OSF_UNROLL _Pragma("unroll")
#else
#define OSF_UNROLL
#define OSF_HOST_DEVICE
#define OSF_INLINE inline
#endif

namespace opensora_fast {

template <typename T>
OSF_INLINE constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// Rounded multiply and fused multiply-add, spelled out so that neither nvcc
// (--fmad) nor gcc (-ffp-contract) can re-associate them: the EMA's bit-exact
// contract depends on exactly these roundings.
OSF_INLINE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

OSF_INLINE float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

OSF_INLINE uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

OSF_INLINE float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

OSF_INLINE double fma_rn(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// Counter-based uniform in [0, 1) from (seed, index): the same value on CPU
// and GPU whatever the launch geometry. 32-bit arithmetic (murmur3's fmix32
// over a bijection of the index) so that the CPU loop vectorises.
OSF_INLINE float uniform01(uint64_t seed, uint64_t index) {
  uint32_t x = static_cast<uint32_t>(index) * 0x9E3779B1u + static_cast<uint32_t>(seed);
  x ^= static_cast<uint32_t>(index >> 32) * 0x85EBCA77u + static_cast<uint32_t>(seed >> 32);
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return static_cast<float>(x >> 8) * (1.0f / 16777216.0f);  // 24 bits
}

// Vector of N elements for 16-byte (or narrower) loads and stores.
template <typename T, int N>
struct alignas(sizeof(T) * N) VecN {
  T v[N];
};

}  // namespace opensora_fast
