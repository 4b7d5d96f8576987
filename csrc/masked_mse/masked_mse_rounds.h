// The body of masked_mse_simd.h's per-ISA round loop, included once per ISA
// with OSF_SIMD_TARGET (the target attribute), OSF_SIMD_W (register traits)
// and OSF_SIMD_NS (the namespace) defined; no include guard on purpose.
//
// rounds(p, t, r, acc): acc[th] = the sums thread th of the block makes over
// the first r rounds of kThreads groups each (partial_thread_sum's loop),
// starting from 0. The caller adds the rest with the scalar core.
namespace OSF_SIMD_NS {

// One set of threads (2 * NL for fp64, else 4 * NL) over one round: their
// groups start at p, t; a holds their sums in register order.
template <typename T, typename W, typename R>
__attribute__((always_inline)) inline OSF_SIMD_TARGET R set_step(const T* p, const T* t, R a) {
  constexpr int V = 16 / sizeof(T), NL = W::NL;
  if constexpr (std::is_same<T, double>::value) {
    const auto d0 = W::sub(p, t), d1 = W::sub(p + NL * V, t + NL * V);
    const auto k0 = W::lo64(d0, d1), k1 = W::hi64(d0, d1);
    a = W::fma(k0, k0, a);
    return W::fma(k1, k1, a);
  } else {
    typename W::F lo[4], hi[4] = {};
    for (int q = 0; q < 4; ++q) {
      if constexpr (std::is_same<T, float>::value) {
        lo[q] = W::sub(p + NL * q * V, t + NL * q * V);
      } else {
        typename W::F plo, phi, tlo, thi;
        W::widen(p + NL * q * V, &plo, &phi);
        W::widen(t + NL * q * V, &tlo, &thi);
        lo[q] = W::sub(plo, tlo);
        hi[q] = W::sub(phi, thi);
      }
    }
    for (int h = 0; h < (V == 8 ? 2 : 1); ++h) {  // k 0..3, then k 4..7
      const typename W::F* d = h == 0 ? lo : hi;
      const auto t0 = W::lo32(d[0], d[1]), t1 = W::hi32(d[0], d[1]);
      const auto t2 = W::lo32(d[2], d[3]), t3 = W::hi32(d[2], d[3]);
      const auto k0 = W::lo64(t0, t2), k1 = W::hi64(t0, t2), k2 = W::lo64(t1, t3), k3 = W::hi64(t1, t3);
      a = W::fma(k0, k0, a);
      a = W::fma(k1, k1, a);
      a = W::fma(k2, k2, a);
      a = W::fma(k3, k3, a);
    }
    return a;
  }
}

template <typename T>
OSF_SIMD_TARGET void rounds(const T* p, const T* t, int64_t r, acc_t<T>* acc) {
  using W = OSF_SIMD_W;
  using A = acc_t<T>;
  constexpr int V = 16 / sizeof(T);
  constexpr int S = (std::is_same<T, double>::value ? 2 : 4) * W::NL;  // threads per set
  alignas(64) A buf[kThreads] = {};                                    // register order
  // sets in memory order, round after round (one stream per input)
  const int64_t sets = r * (kThreads / S);
  for (int64_t s = 0; s < sets; ++s) {
    A* b = buf + (s * S) % kThreads;
    W::store(b, set_step<T, W>(p + s * S * V, t + s * S * V, W::load(b)));
  }
  unpermute<A, W::NL>(buf, acc);
}

}  // namespace OSF_SIMD_NS

#undef OSF_SIMD_TARGET
#undef OSF_SIMD_W
#undef OSF_SIMD_NS
