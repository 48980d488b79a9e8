// AVX2 path of the transposed dequantization (dequant_t16.h): the AVX-512 path's scheme on two 8-lane
// vectors per input channel (rows 0..7 and 8..15 of the tile). A plane's bit j of 8 bytes becomes a
// lane mask (and, compare), and the masked scale (+0.0 where the bit is clear, which leaves a sum
// unchanged) is added, so the float operations are the scalar path's. Without it an AVX2-only CPU
// dequantized through the scalar path, which writes one float per channel row (stride N) and made a
// 128-token prefill ~3x slower than the fp32 model's on AMD Zen 3 (docs/RESULTS.md).
// Compiled for AVX2 + FMA + F16C by the pragma; called only after a run-time CPU check.

#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>

#include <cstring>

#include "dequant_t16.h"

namespace dbquant {
namespace cpu {

namespace {

// 8 floats -> 8 bfloat16 (float_to_bf16, lane by lane), in the low 128 bits.
inline __m128i to_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));  // r < 2^16: exact
}

}  // namespace

void dequantize_t_avx2(const T16Weight& w, void* out, bool bf16, int64_t t0, int64_t t1) {
  const int64_t G = w.groups(), cpg = w.group_size / 8, P = w.P, N = w.N;
  float* of = static_cast<float*>(out);
  uint16_t* ob = static_cast<uint16_t*>(out);
  UnitPlanes units(w);
  for (int64_t t = t0; t < t1; ++t) {
    const auto [tp, ts, to] = units.ptrs(t);
    const int64_t n0 = t * kTile;
    const int rows = int(N - n0 < kTile ? N - n0 : kTile);
    for (int64_t g = 0; g < G; ++g) {
      __m256 a[kMaxPlanes][2];
      for (int64_t p = 0; p < P; ++p)
        for (int h = 0; h < 2; ++h)
          a[p][h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(ts + (g * P + p) * kTile + 8 * h)));
      __m256 beta[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
      if (to)
        for (int h = 0; h < 2; ++h)
          beta[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(to + g * kTile + 8 * h)));
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
        __m256i b[kMaxPlanes][2];
        for (int64_t p = 0; p < P; ++p)
          for (int h = 0; h < 2; ++h)
            b[p][h] = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(tp + (c * P + p) * kTile + 8 * h)));
        for (int j = 0; j < 8 && 8 * c + j < w.K; ++j) {
          const __m256i bit = _mm256_set1_epi32(1 << j);
          alignas(32) float v[kTile];
          for (int h = 0; h < 2; ++h) {
            __m256 s = _mm256_setzero_ps();
            for (int64_t p = 0; p < P; ++p) {  // plane order, as the scalar path adds
              const __m256 on = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b[p][h], bit), bit));
              s = _mm256_add_ps(s, _mm256_and_ps(on, a[p][h]));
            }
            s = _mm256_add_ps(s, beta[h]);
            if (rows == kTile) {
              const int64_t i = (8 * c + j) * N + n0 + 8 * h;
              if (bf16) _mm_storeu_si128((__m128i*)(ob + i), to_bf16(s));
              else _mm256_storeu_ps(of + i, s);
            } else {
              _mm256_store_ps(v + 8 * h, s);
            }
          }
          if (rows < kTile) {  // the last, partial tile: only its `rows` columns exist in out
            const int64_t i = (8 * c + j) * N + n0;
            if (bf16) {
              for (int r = 0; r < rows; ++r) ob[i + r] = float_to_bf16(v[r]);
            } else {
              std::memcpy(of + i, v, sizeof(float) * rows);
            }
          }
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace dbquant
