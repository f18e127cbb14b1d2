// Horizontal sums of AVX-512 fp32 vectors in one fixed tree, shared by the kernels whose batch invariance
// depends on it: the pairs (i, i+8), (i, i+4), (i, i+2), (i, i+1), the order of GCC's _mm512_reduce_add_ps,
// written out so that one vector at a time (reduce1) and sixteen at once (reduce16) give the same bits.
#pragma once
#include <immintrin.h>

namespace ember_simd {

inline float reduce1(__m512 v) {
  const __m256 s = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));  // (i, i+8)
  const __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));      // (i, i+4)
  const __m128 u = _mm_add_ps(t, _mm_movehl_ps(t, t));                                       // (i, i+2)
  return _mm_cvtss_f32(_mm_add_ss(u, _mm_movehdup_ps(u)));                                   // (i, i+1)
}

// Lane l of the result is reduce1(v[l]), for 16 vectors at once (45 instructions instead of 16 * 8).
inline __m512 reduce16(const __m512 (&v)[16]) {
  __m512 s[8], t[4], u[2];
  // The shuffles below leave vector x in lane (x % 4) * 4 + x / 4; feeding them in that order undoes it.
  auto in = [&](int x) { return v[(x % 4) * 4 + x / 4]; };
  for (int m = 0; m < 8; ++m) {
    const __m512 a = in(2 * m), b = in(2 * m + 1);
    s[m] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int m = 0; m < 4; ++m)
    t[m] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * m], s[2 * m + 1], 0x88),
                         _mm512_shuffle_f32x4(s[2 * m], s[2 * m + 1], 0xDD));
  for (int m = 0; m < 2; ++m)
    u[m] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * m], t[2 * m + 1], 0x44), _mm512_shuffle_ps(t[2 * m], t[2 * m + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x88), _mm512_shuffle_ps(u[0], u[1], 0xDD));
}

}  // namespace ember_simd
