// AVX2 path of the t16 lookup-table kernel (see dbgemm_t16.h for layout and math).
// A 16-entry table is two 8-float registers: vpermps picks within each from the low 3
// index bits and a blend on index bit 3 picks the register. A 16-row tile is processed
// as two 8-row halves. Compiled for AVX2 + FMA + F16C by the pragma below; only called
// after a run-time CPU check.

#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>

#include <algorithm>

#include "dbgemm_t16.h"

namespace dbquant {
namespace cpu {

namespace {

constexpr int kHalf = 8;
constexpr int kRowsPerPass = 1;  // 16 ymm registers: 5 accumulators + 4 indices + 4 table halves

// Table lookup: lane r gets T[idx[r] & 15] where T = (t0: entries 0-7, t1: entries 8-15).
inline __m256 lookup(__m256 t0, __m256 t1, __m256i idx) {
  const __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // bit 3 -> sign bit
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, idx), _mm256_permutevar8x32_ps(t1, idx), sel);
}

template <int MB>
inline void half_rows(const T16Weight& w, const float* lut, const float* gsum, int64_t m0,
                      float* y, int64_t t, int h) {
  const int64_t G = w.groups(), C8 = w.kp() / 8, cpg = w.group_size / 8, lf = lut_floats(w);
  const uint8_t* tp = w.planes + t * C8 * 2 * kTile + h * kHalf;
  const uint16_t* ts = w.scales + t * G * 2 * kTile + h * kHalf;
  const uint16_t* to = w.offset ? w.offset + t * G * kTile + h * kHalf : nullptr;
  const float* L[MB];
  for (int i = 0; i < MB; ++i) L[i] = lut + (m0 + i) * lf;
  const __m256i low = _mm256_set1_epi32(15);

  __m256 acc_y[MB];
  for (int i = 0; i < MB; ++i) acc_y[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 lo1[MB], hi1[MB], lo2[MB], hi2[MB];
    for (int i = 0; i < MB; ++i) lo1[i] = hi1[i] = lo2[i] = hi2[i] = _mm256_setzero_ps();
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(tp + (c * 2 + 0) * kTile)));
      const __m256i b2 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(tp + (c * 2 + 1) * kTile)));
      const __m256i b1l = _mm256_and_si256(b1, low), b1h = _mm256_srli_epi32(b1, 4);
      const __m256i b2l = _mm256_and_si256(b2, low), b2h = _mm256_srli_epi32(b2, 4);
      for (int i = 0; i < MB; ++i) {
        const float* lo = L[i] + 16 * (2 * c);
        const float* hi = L[i] + 16 * (2 * c + 1);
        const __m256 tl0 = _mm256_loadu_ps(lo), tl1 = _mm256_loadu_ps(lo + 8);
        const __m256 th0 = _mm256_loadu_ps(hi), th1 = _mm256_loadu_ps(hi + 8);
        lo1[i] = _mm256_add_ps(lo1[i], lookup(tl0, tl1, b1l));
        hi1[i] = _mm256_add_ps(hi1[i], lookup(th0, th1, b1h));
        lo2[i] = _mm256_add_ps(lo2[i], lookup(tl0, tl1, b2l));
        hi2[i] = _mm256_add_ps(hi2[i], lookup(th0, th1, b2h));
      }
    }
    const __m256 a1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(ts + g * 2 * kTile)));
    const __m256 a2 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(ts + g * 2 * kTile + kTile)));
    for (int i = 0; i < MB; ++i) {
      acc_y[i] = _mm256_fmadd_ps(a1, _mm256_add_ps(lo1[i], hi1[i]), acc_y[i]);
      acc_y[i] = _mm256_fmadd_ps(a2, _mm256_add_ps(lo2[i], hi2[i]), acc_y[i]);
    }
    if (to) {
      const __m256 beta = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(to + g * kTile)));
      for (int i = 0; i < MB; ++i)
        acc_y[i] = _mm256_fmadd_ps(beta, _mm256_set1_ps(gsum[(m0 + i) * G + g]), acc_y[i]);
    }
  }
  const int64_t n0 = t * kTile + h * kHalf;
  const int64_t rows = std::min<int64_t>(kHalf, w.N - n0);
  if (rows <= 0) return;
  for (int i = 0; i < MB; ++i) {
    alignas(32) float out[kHalf];
    _mm256_store_ps(out, acc_y[i]);
    float* yr = y + (m0 + i) * w.N + n0;
    for (int64_t r = 0; r < rows; ++r) yr[r] = w.bias ? out[r] + w.bias[n0 + r] : out[r];
  }
}

}  // namespace

void build_luts_avx2(const T16Weight& w, const float* x, float* lut, float* gsum, int64_t m0,
                     int64_t m1) {
  const int64_t K = w.K, q_count = w.kp() / 4, lf = lut_floats(w);
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * K;
    float* lr = lut + m * lf;
    for (int64_t q = 0; q < q_count; ++q) {
      __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps();  // entries 0-7, 8-15
      __m256 v[4];
      for (int j = 0; j < 4; ++j) v[j] = _mm256_set1_ps(4 * q + j < K ? xr[4 * q + j] : 0.0f);
      // Entry i adds x[j] when bit j of i is set (a blend is the masked add).
      t0 = _mm256_blend_ps(t0, _mm256_add_ps(t0, v[0]), 0xAA);
      t1 = _mm256_blend_ps(t1, _mm256_add_ps(t1, v[0]), 0xAA);
      t0 = _mm256_blend_ps(t0, _mm256_add_ps(t0, v[1]), 0xCC);
      t1 = _mm256_blend_ps(t1, _mm256_add_ps(t1, v[1]), 0xCC);
      t0 = _mm256_blend_ps(t0, _mm256_add_ps(t0, v[2]), 0xF0);
      t1 = _mm256_blend_ps(t1, _mm256_add_ps(t1, v[2]), 0xF0);
      t1 = _mm256_add_ps(t1, v[3]);  // bit 3 is set in entries 8-15 only
      _mm256_storeu_ps(lr + 16 * q, t0);
      _mm256_storeu_ps(lr + 16 * q + 8, t1);
    }
    if (gsum) group_sums(w, lr, gsum + m * w.groups());
  }
}

void gemm_tiles_avx2(const T16Weight& w, const float* lut, const float* gsum, int64_t M,
                     float* y, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int h = 0; h < 2; ++h) {
      for (int64_t m = 0; m < M; m += kRowsPerPass) half_rows<kRowsPerPass>(w, lut, gsum, m, y, t, h);
    }
  }
}

}  // namespace cpu
}  // namespace dbquant
