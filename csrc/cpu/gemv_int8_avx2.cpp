// AVX2 paths of the int8-weight projection (see gemv_int8.h), for CPUs without AVX-512
// (e.g. the AMD EPYC VMs this project also runs on). Float activations: widen 8 codes to
// float in registers and FMA with the activations; four output rows share each activation
// load and keep four independent accumulators. W8A8: integer products per block of 32.
// Compiled for AVX2 + FMA by the pragma; called only after a run-time CPU check.

#pragma GCC target("avx2,fma")

#include <immintrin.h>

#include "gemv_int8.h"
#include "prefetch.h"

namespace dbquant {
namespace cpu {

namespace {

inline __m256 widen(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

}  // namespace

void gemv_int8_rows_avx2(const float* x, const int8_t* wq, const float* s, int64_t M, int64_t N,
                         int64_t K, float* y, int64_t n0, int64_t n1) {
  const int64_t kv = K / 8 * 8;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const int8_t* w0 = wq + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t k = 0; k < kv; k += 8) {
        const __m256 xv = _mm256_loadu_ps(xr + k);
        prefetch_ahead(w0 + 4 * k);  // the four rows' 4K bytes, half a line per step
        a0 = _mm256_fmadd_ps(xv, widen(w0 + k), a0);
        a1 = _mm256_fmadd_ps(xv, widen(w0 + K + k), a1);
        a2 = _mm256_fmadd_ps(xv, widen(w0 + 2 * K + k), a2);
        a3 = _mm256_fmadd_ps(xv, widen(w0 + 3 * K + k), a3);
      }
      float r[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
      for (int64_t k = kv; k < K; ++k)  // the K % 8 tail
        for (int j = 0; j < 4; ++j) r[j] += xr[k] * float(w0[j * K + k]);
      float* yr = y + m * N + n;
      for (int j = 0; j < 4; ++j) yr[j] = s[n + j] * r[j];
    }
  }
  if (n < n1) gemv_int8_rows_scalar(x, wq, s, M, N, K, y, n, n1);
}

void gemv_w8a8_rows_avx2(const int8_t* xq, const float* xs, const int8_t* wq, const float* s, int64_t M,
                         int64_t N, int64_t K, float* y, int64_t n0, int64_t n1) {
  const int64_t B = K / kQ8Block;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xr = xq + m * K;
    const float* sr = xs + m * B;
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* w = wq + n * K;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t b = 0; b < B; ++b) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(xr + b * kQ8Block));
        const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + b * kQ8Block));
        prefetch_ahead(w + b * kQ8Block);
        // |x| (unsigned) times w * sign(x) (signed) = x * w; pairs summed in int16 (at most
        // 2 * 127 * 127: no saturation), then pairs of pairs in int32: the block's exact dot
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(xv, xv),
                                                                 _mm256_sign_epi8(wv, xv)), ones);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(sr + b), acc);
      }
      y[m * N + n] = s[n] * hsum(acc);
    }
  }
}

}  // namespace cpu
}  // namespace dbquant
