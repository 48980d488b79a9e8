// AVX2 path of the t16 kernel (see dbgemm_t16.h for the weight layout and the shared math).
//
// Unlike the scalar and AVX-512 paths, this one tabulates 2-channel chunks, not 4-channel
// ones: AVX2 has no 16-entry float lookup (it would take two cross-lane vpermps and a
// blend, which are slow on the AMD Zen cores of this project's machines), but a 4-entry
// table broadcast to both 128-bit lanes is one in-lane vpermilps, which reads only the
// low 2 bits of each 32-bit index, so no mask is needed either. Per activation row and
// chunk q (channels 2q, 2q+1):
//   lut2[q] = {0, x[2q], x[2q+1], x[2q] + x[2q+1]}            (4 floats)
// and byte c of a plane row (channels 8c..8c+7, LSB first) is the four indices
// (b >> 0, b >> 2, b >> 4, b >> 6) & 3 into chunks 4c..4c+3. A 16-row tile is processed
// as two 8-row halves. Per group j and row:
//   s_p = even_p + odd_p, even_p / odd_p = sums, in order, of the group's chunks 4c, 4c+2 /
//   4c+1, 4c+3 of plane p; y = fma(alpha_1, s_1, y); y = fma(alpha_2, s_2, y);
//   y = fma(beta, gsum_j, y) with gsum_j = the in-order sum of the group's x.
// So this path adds the same products in another order than the 16-entry paths: it
// agrees with them to float rounding, not bit for bit (tests/test_cpu_kernel.py).
// Compiled for AVX2 + FMA + F16C by the pragma below; only called after a run-time check.

#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>

#include <algorithm>

#include "dbgemm_t16.h"

namespace dbquant {
namespace cpu {

namespace {

constexpr int kHalf = 8;

void half_tile(const T16Weight& w, const float* lut2, const float* gsum, float* yrow, int64_t t, int h) {
  const int64_t G = w.groups(), C8 = w.kp() / 8, cpg = w.group_size / 8;
  const uint8_t* tp = w.planes + t * C8 * 2 * kTile + h * kHalf;
  const uint16_t* ts = w.scales + t * G * 2 * kTile + h * kHalf;
  const uint16_t* to = w.offset ? w.offset + t * G * kTile + h * kHalf : nullptr;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 e1 = _mm256_setzero_ps(), o1 = e1, e2 = e1, o2 = e1;
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(tp + (c * 2 + 0) * kTile)));
      const __m256i b2 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(tp + (c * 2 + 1) * kTile)));
      const float* q = lut2 + 16 * c;  // chunks 4c..4c+3, 4 floats each
      const __m256 t0 = _mm256_broadcast_ps((const __m128*)(q + 0));
      const __m256 t1 = _mm256_broadcast_ps((const __m128*)(q + 4));
      const __m256 t2 = _mm256_broadcast_ps((const __m128*)(q + 8));
      const __m256 t3 = _mm256_broadcast_ps((const __m128*)(q + 12));
      e1 = _mm256_add_ps(e1, _mm256_permutevar_ps(t0, b1));
      e2 = _mm256_add_ps(e2, _mm256_permutevar_ps(t0, b2));
      o1 = _mm256_add_ps(o1, _mm256_permutevar_ps(t1, _mm256_srli_epi32(b1, 2)));
      o2 = _mm256_add_ps(o2, _mm256_permutevar_ps(t1, _mm256_srli_epi32(b2, 2)));
      e1 = _mm256_add_ps(e1, _mm256_permutevar_ps(t2, _mm256_srli_epi32(b1, 4)));
      e2 = _mm256_add_ps(e2, _mm256_permutevar_ps(t2, _mm256_srli_epi32(b2, 4)));
      o1 = _mm256_add_ps(o1, _mm256_permutevar_ps(t3, _mm256_srli_epi32(b1, 6)));
      o2 = _mm256_add_ps(o2, _mm256_permutevar_ps(t3, _mm256_srli_epi32(b2, 6)));
    }
    const __m256 a1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(ts + g * 2 * kTile)));
    const __m256 a2 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(ts + g * 2 * kTile + kTile)));
    acc = _mm256_fmadd_ps(a1, _mm256_add_ps(e1, o1), acc);
    acc = _mm256_fmadd_ps(a2, _mm256_add_ps(e2, o2), acc);
    if (to) {
      const __m256 beta = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(to + g * kTile)));
      acc = _mm256_fmadd_ps(beta, _mm256_set1_ps(gsum[g]), acc);
    }
  }
  const int64_t n0 = t * kTile + h * kHalf;
  const int64_t rows = std::min<int64_t>(kHalf, w.N - n0);
  if (rows <= 0) return;
  alignas(32) float out[kHalf];
  _mm256_store_ps(out, acc);
  for (int64_t r = 0; r < rows; ++r) yrow[n0 + r] = w.bias ? out[r] + w.bias[n0 + r] : out[r];
}

}  // namespace

void build_luts_avx2(const T16Weight& w, const float* x, float* lut, float* gsum, int64_t m0,
                     int64_t m1) {
  const int64_t K = w.K, Kp = w.kp(), lf = lut_floats(w), G = w.groups();
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * K;
    float* lr = lut + m * lf;  // the first 2 Kp of the row's lut_floats(w) = 4 Kp floats
    for (int64_t q = 0; q < Kp / 2; ++q) {
      const float a = 2 * q < K ? xr[2 * q] : 0.0f, b = 2 * q + 1 < K ? xr[2 * q + 1] : 0.0f;
      lr[4 * q + 0] = 0.0f;
      lr[4 * q + 1] = a;
      lr[4 * q + 2] = b;
      lr[4 * q + 3] = a + b;
    }
    if (gsum) {
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.0f;
        for (int64_t k = g * w.group_size; k < std::min(K, (g + 1) * w.group_size); ++k) s += xr[k];
        gsum[m * G + g] = s;
      }
    }
  }
}

void gemm_tiles_avx2(const T16Weight& w, const float* lut, const float* gsum, int64_t M,
                     float* y, int64_t t0, int64_t t1) {
  const int64_t lf = lut_floats(w), G = w.groups();
  for (int64_t t = t0; t < t1; ++t)
    for (int h = 0; h < 2; ++h)
      for (int64_t m = 0; m < M; ++m)
        half_tile(w, lut + m * lf, gsum ? gsum + m * G : nullptr, y + m * w.N, t, h);
}

}  // namespace cpu
}  // namespace dbquant
