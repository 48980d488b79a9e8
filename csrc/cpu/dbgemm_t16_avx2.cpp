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
//   4c+1, 4c+3 of plane p; y = fma(alpha_1, s_1, y); ...; y = fma(alpha_P, s_P, y);
//   y = fma(beta, gsum_j, y) with gsum_j = the in-order sum of the group's x.
// So this path adds the same products in another order than the 16-entry paths: it
// agrees with them to float rounding, not bit for bit (tests/test_cpu_kernel.py).
// Compiled for AVX2 + FMA + F16C by the pragma below; only called after a run-time check.

#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>

#include <algorithm>

#include "dbgemm_t16.h"
#include "prefetch.h"

namespace dbquant {
namespace cpu {

namespace {

constexpr int kHalf = 8;

// One table pass over group g for planes p0 .. p0 + NP - 1 (NP = 1 or 2) of one 8-row half,
// then acc = fma(alpha_p, even_p + odd_p, acc) in plane order (NP = 2: the dual-binary pass).
template <int NP>
inline __m256 plane_pass(const T16Weight& w, const float* lut2, const uint8_t* tp, const uint16_t* ts,
                         int64_t g, int64_t p0, __m256 acc) {
  const int64_t P = w.P, cpg = w.group_size / 8;
  __m256 e[NP], o[NP];
  for (int q = 0; q < NP; ++q) e[q] = o[q] = _mm256_setzero_ps();
  prefetch_ahead(ts + (g * P + p0) * kTile);
  for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
    prefetch_ahead(tp + (c * P + p0) * kTile);
    const float* tq = lut2 + 16 * c;  // chunks 4c..4c+3, 4 floats each
    const __m256 t0 = _mm256_broadcast_ps((const __m128*)(tq + 0));
    const __m256 t1 = _mm256_broadcast_ps((const __m128*)(tq + 4));
    const __m256 t2 = _mm256_broadcast_ps((const __m128*)(tq + 8));
    const __m256 t3 = _mm256_broadcast_ps((const __m128*)(tq + 12));
    __m256i b[NP];
    for (int q = 0; q < NP; ++q)
      b[q] = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(tp + (c * P + p0 + q) * kTile)));
    for (int q = 0; q < NP; ++q) e[q] = _mm256_add_ps(e[q], _mm256_permutevar_ps(t0, b[q]));
    for (int q = 0; q < NP; ++q) o[q] = _mm256_add_ps(o[q], _mm256_permutevar_ps(t1, _mm256_srli_epi32(b[q], 2)));
    for (int q = 0; q < NP; ++q) e[q] = _mm256_add_ps(e[q], _mm256_permutevar_ps(t2, _mm256_srli_epi32(b[q], 4)));
    for (int q = 0; q < NP; ++q) o[q] = _mm256_add_ps(o[q], _mm256_permutevar_ps(t3, _mm256_srli_epi32(b[q], 6)));
  }
  for (int q = 0; q < NP; ++q) {
    const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(ts + (g * P + p0 + q) * kTile)));
    acc = _mm256_fmadd_ps(a, _mm256_add_ps(e[q], o[q]), acc);
  }
  return acc;
}

void half_tile(const T16Weight& w, const float* lut2, const float* gsum, float* yrow, int64_t t, const uint8_t* tile_planes,
               int h) {
  const int64_t G = w.groups(), P = w.P;
  const uint8_t* tp = tile_planes + h * kHalf;
  const uint16_t* ts = w.scales + t * G * P * kTile + h * kHalf;
  const uint16_t* to = w.offset ? w.offset + t * G * kTile + h * kHalf : nullptr;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    int64_t p = 0;
    for (; p + 2 <= P; p += 2) acc = plane_pass<2>(w, lut2, tp, ts, g, p, acc);
    if (p < P) acc = plane_pass<1>(w, lut2, tp, ts, g, p, acc);
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
  UnitPlanes units(w);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tp = units.tile(t);
    for (int h = 0; h < 2; ++h)
      for (int64_t m = 0; m < M; ++m)
        half_tile(w, lut + m * lf, gsum ? gsum + m * G : nullptr, y + m * w.N, t, tp, h);
  }
}

}  // namespace cpu
}  // namespace dbquant
