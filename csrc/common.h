// Shared by every op: host/device qualifiers and small helpers. Kept free of
// torch/extension.h so that .cu files stay cheap to compile.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define OSF_HOST_DEVICE __host__ __device__
#define OSF_INLINE __host__ __device__ __forceinline__
#define OSF_UNROLL _Pragma("unroll")
#else
#define OSF_UNROLL
#define OSF_HOST_DEVICE
// forced as __forceinline__ is on the device: the CPU kernels' loops vectorise only
// with the scalar core inlined, and GCC's heuristics outline it once a file also
// instantiates the CUDA bodies for the grid walks
#define OSF_INLINE inline __attribute__((always_inline))
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

OSF_INLINE uint64_t f64_bits(double f) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(f));
#else
  uint64_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

OSF_INLINE double f64_from_bits(uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(u));
#else
  double f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// Rounds a float/double result to the output type T, writing every NaN as one
// canonical quiet NaN (positive, no payload: fp32 0x7FC00000, fp64
// 0x7FF8000000000000, bf16 0x7FC0, fp16 0x7E00). The CPU keeps input payloads
// and c10 writes 0x7FC0 for bf16 while the GPU's cvt.rn writes 0x7FFF; one
// pattern keeps "GPU = CPU bit for bit" true for NaN too. A compare and a select:
// the CPU loops still vectorise.
template <typename T>
OSF_INLINE T canonical_nan() {
  if constexpr (std::is_same<T, float>::value) {
    return f32_from_bits(0x7FC00000u);
  } else if constexpr (std::is_same<T, double>::value) {
    return f64_from_bits(0x7FF8000000000000ull);
  } else if constexpr (std::is_same<T, c10::BFloat16>::value) {
    return c10::BFloat16(0x7FC0, c10::BFloat16::from_bits());
  } else {
    static_assert(std::is_same<T, c10::Half>::value, "canonical_nan: fp32, fp64, bf16 or fp16");
    return c10::Half(0x7E00, c10::Half::from_bits());
  }
}

template <typename T>
struct Canonical {
  static OSF_INLINE T cast(float r) { return r != r ? canonical_nan<T>() : static_cast<T>(r); }
};
template <>
struct Canonical<float> {
  static OSF_INLINE float cast(float r) { return r != r ? canonical_nan<float>() : r; }
  static OSF_INLINE float cast(double r) { return cast(static_cast<float>(r)); }
};
template <>
struct Canonical<double> {
  static OSF_INLINE double cast(double r) { return r != r ? canonical_nan<double>() : r; }
};

template <typename T, typename A>
OSF_INLINE T round_to(A r) {
  return Canonical<T>::cast(r);
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

// A type as a value, for dtype dispatch: f(Tag<float>{}) then
// `using T = typename decltype(tag)::type;`.
template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<A>{}, Tag<B>{}) for a pair of floating dtypes (a, b): fp32, bf16,
// fp16, and fp64 where WithDouble (so an op without fp64 instantiates no fp64
// kernel). The op's checks refused every other dtype: the error, worded
// "<op>: unsupported <b_name> dtype ...", is internal.
template <bool WithDouble, typename F>
inline void dispatch_float_pair(c10::ScalarType a, c10::ScalarType b, const char* op, const char* a_name,
                                const char* b_name, F&& f) {
  const auto on_b = [&](auto at) {
    switch (b) {
      case c10::ScalarType::Float:
        return f(at, Tag<float>{});
      case c10::ScalarType::BFloat16:
        return f(at, Tag<c10::BFloat16>{});
      case c10::ScalarType::Half:
        return f(at, Tag<c10::Half>{});
      case c10::ScalarType::Double:
        if constexpr (WithDouble)
          return f(at, Tag<double>{});
        break;
      default:
        break;
    }
    TORCH_CHECK(false, op, ": unsupported ", b_name, " dtype ", b);
  };
  switch (a) {
    case c10::ScalarType::Float:
      return on_b(Tag<float>{});
    case c10::ScalarType::BFloat16:
      return on_b(Tag<c10::BFloat16>{});
    case c10::ScalarType::Half:
      return on_b(Tag<c10::Half>{});
    case c10::ScalarType::Double:
      if constexpr (WithDouble)
        return on_b(Tag<double>{});
      break;
    default:
      break;
  }
  TORCH_CHECK(false, op, ": unsupported ", a_name, " dtype ", a);
}

// Vector of N elements for 16-byte (or narrower) loads and stores.
template <typename T, int N>
struct alignas(sizeof(T) * N) VecN {
  T v[N];
};

}  // namespace opensora_fast
