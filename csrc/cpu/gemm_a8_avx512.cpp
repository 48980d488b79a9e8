// AVX-512 path of the activations' codes of the 8-bit prefill GEMM (quantize_a8, gemm_a8.h): the same bytes
// and floats as the scalar and AVX2 paths. Per group: the range and the NaN probe over 16 channels a vector
// (min, max and a sum of zeros do not depend on the order), the sum xs in gemm_a8.h's 8 partial sums (each
// vector's low then high 8 channels added to one 8-lane accumulator: channel k into partial k & 7, in
// order), the lanes reduced by shuffles instead of a scalar loop, and the codes 16 a vector:
// nearbyint(x * inv) + z, clamped to [0, 255] (max with 0, then vpmovusdb saturates at 255). The codes of
// 128 x 576 activations: 40.8 us against 70.9 on the AVX2 path (Zen 4, docs/RESULTS.md).
// Compiled for AVX-512 F/BW/VL/DQ by the pragma; called only after a run-time CPU check (quantize_a8).

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on its own _mm512_reduce_{min,max}_ps

#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "gemm_a8.h"

namespace dbquant {
namespace cpu {

void quantize_a8_avx512(const T16Weight& w, const float* x, uint8_t* xu, int32_t* xz, float* sx, float* xs,
                        int64_t m0, int64_t m1) {
  const int64_t g = w.group_size, G = w.groups(), Kp = w.kp(), K = w.K;
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t j = 0; j < G; ++j) {
      const int64_t k0 = j * g, n = std::min(K, k0 + g) - k0, n16 = n & ~int64_t(15), i = m * G + j;
      const float* xg = x + m * K + k0;
      uint8_t* q = xu + m * Kp + k0;
      __m512 vlo = _mm512_setzero_ps(), vhi = vlo, vprobe = vlo;
      __m256 vsum = _mm256_setzero_ps();
      for (int64_t k = 0; k < n16; k += 16) {
        const __m512 v = _mm512_loadu_ps(xg + k);
        vlo = _mm512_min_ps(vlo, v);
        vhi = _mm512_max_ps(vhi, v);
        vprobe = _mm512_add_ps(vprobe, _mm512_mul_ps(v, _mm512_setzero_ps()));
        vsum = _mm256_add_ps(vsum, _mm512_castps512_ps256(v));  // channels k .. k + 7 into partials 0..7
        vsum = _mm256_add_ps(vsum, _mm512_extractf32x8_ps(v, 1));
      }
      A8Stats st;
      _mm256_storeu_ps(st.part, vsum);
      st.lo = std::min(0.0f, _mm512_reduce_min_ps(vlo));
      st.hi = std::max(0.0f, _mm512_reduce_max_ps(vhi));
      st.probe = _mm512_reduce_add_ps(vprobe);  // 0, or NaN where a channel is NaN or infinite
      st.add(xg, n16, n);
      a8_finish_group(st, n, g, q, xz[i], sx[i], xs[i], [&](A8Scale s) {
        const __m512 vinv = _mm512_set1_ps(s.inv);
        const __m512i vz = _mm512_set1_epi32(s.z), zero = _mm512_setzero_si512();
        for (int64_t k = 0; k < n16; k += 16) {
          // nearbyint (to nearest even, as the scalar loop's default rounding mode), + z, clamped to [0, 255]
          const __m512i c = _mm512_add_epi32(
              _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + k), vinv),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
              vz);
          _mm_storeu_si128((__m128i*)(q + k), _mm512_cvtusepi32_epi8(_mm512_max_epi32(c, zero)));
        }
        a8_codes(xg, n16, n, s, q);
      });
    }
}

}  // namespace cpu
}  // namespace dbquant
