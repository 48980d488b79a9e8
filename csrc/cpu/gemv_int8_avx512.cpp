// AVX-512 path of the int8-weight projection (see gemv_int8.h): widen 16 codes to float
// in registers and FMA with the activations; four output rows share each activation
// load and keep four independent accumulators. Compiled for AVX-512F by the pragma;
// called only after a run-time CPU check.

#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
// GCC 12's own intrinsic headers trip -Wmaybe-uninitialized (their `__Y = __Y` idiom).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include "gemv_int8.h"
#include "prefetch.h"

namespace dbquant {
namespace cpu {

namespace {

inline __m512 widen(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

inline __m512 widen_tail(const int8_t* p, __mmask16 k) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, p)));
}

}  // namespace

void gemv_int8_rows_avx512(const float* x, const int8_t* wq, const float* s, int64_t M, int64_t N,
                           int64_t K, float* y, int64_t n0, int64_t n1) {
  const int64_t kv = K / 16 * 16;
  const __mmask16 tail = __mmask16((1u << (K - kv)) - 1);
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const int8_t* w0 = wq + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t k = 0; k < kv; k += 16) {
        const __m512 xv = _mm512_loadu_ps(xr + k);
        prefetch_ahead(w0 + 4 * k);  // the four rows' 4K bytes, one line per step
        a0 = _mm512_fmadd_ps(xv, widen(w0 + k), a0);
        a1 = _mm512_fmadd_ps(xv, widen(w0 + K + k), a1);
        a2 = _mm512_fmadd_ps(xv, widen(w0 + 2 * K + k), a2);
        a3 = _mm512_fmadd_ps(xv, widen(w0 + 3 * K + k), a3);
      }
      if (tail) {
        const __m512 xv = _mm512_maskz_loadu_ps(tail, xr + kv);
        a0 = _mm512_fmadd_ps(xv, widen_tail(w0 + kv, tail), a0);
        a1 = _mm512_fmadd_ps(xv, widen_tail(w0 + K + kv, tail), a1);
        a2 = _mm512_fmadd_ps(xv, widen_tail(w0 + 2 * K + kv, tail), a2);
        a3 = _mm512_fmadd_ps(xv, widen_tail(w0 + 3 * K + kv, tail), a3);
      }
      float* yr = y + m * N + n;
      yr[0] = s[n] * _mm512_reduce_add_ps(a0);
      yr[1] = s[n + 1] * _mm512_reduce_add_ps(a1);
      yr[2] = s[n + 2] * _mm512_reduce_add_ps(a2);
      yr[3] = s[n + 3] * _mm512_reduce_add_ps(a3);
    }
  }
  if (n < n1) gemv_int8_rows_scalar(x, wq, s, M, N, K, y, n, n1);
}

}  // namespace cpu
}  // namespace dbquant
