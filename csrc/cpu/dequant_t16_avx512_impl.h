// AVX-512 paths of the transposed dequantization (dequant_t16.h): one 16-lane vector per input
// channel holds the tile's 16 rows; a plane's bit j of 16 bytes is one mask, a masked add. Included by
// two translation units, each compiled for its ISA by its own pragma:
//   dequant_t16_avx512.cpp      (AVX-512F/BW/VL)  DQ_CVTNE 0: bfloat16 by integer round-to-nearest-even
//                               (to_bf16: five integer ops and a vpmovdw per 16 weights);
//   dequant_t16_avx512bf16.cpp  (+ AVX512-BF16)   DQ_CVTNE 1: bfloat16 by one vcvtneps2bf16, the same
//                               rounding (round to nearest even) on the finite, normal values the weights
//                               are (sums of float16 scales: never float32 subnormals, which it flushes).
// Reads the planes in either byte order in place (t16_unit_avx512.h). Needs DQ_NS and DQ_CVTNE defined.

#include <immintrin.h>

#include "dequant_t16.h"
#include "t16_unit_avx512.h"

namespace dbquant {
namespace cpu {
namespace DQ_NS {

// 16 floats -> 16 bfloat16, rounded to nearest even (float_to_bf16, lane by lane).
inline __m256i to_bf16(__m512 v) {
#if DQ_CVTNE
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
#endif
}

// COLS: the planes' byte order (dbgemm_t16.h), read in place.
template <int COLS>
void tiles(const T16Weight& w, void* out, bool bf16, int64_t t0, int64_t t1) {
  const int64_t G = w.groups(), cpg = w.group_size / 8, P = w.P, N = w.N;
  float* of = static_cast<float*>(out);
  uint16_t* ob = static_cast<uint16_t*>(out);
  for (int64_t t = t0; t < t1; ++t) {
    const auto [tp, ts, to] = tile_ptrs(w, t);
    const int64_t n0 = t * kTile;
    const int rows = int(N - n0 < kTile ? N - n0 : kTile);
    const __mmask16 keep = __mmask16((1u << rows) - 1);
    for (int64_t g = 0; g < G; ++g) {
      __m512 a[kMaxPlanes];
      for (int64_t p = 0; p < P; ++p)
        a[p] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(ts + (g * P + p) * kTile)));
      const __m512 beta = to ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(to + g * kTile)))
                             : _mm512_setzero_ps();
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
        __m512i b[kMaxPlanes];
        for (int64_t p = 0; p < P; ++p) b[p] = unit_lanes<COLS>(tp, P, c, p);  // bit j < 8 of each lane: the byte's
        for (int j = 0; j < 8 && 8 * c + j < w.K; ++j) {
          const __m512i bit = _mm512_set1_epi32(1 << j);
          __m512 v = _mm512_setzero_ps();
          for (int64_t p = 0; p < P; ++p)  // plane order, as the scalar path adds
            v = _mm512_mask_add_ps(v, _mm512_test_epi32_mask(b[p], bit), v, a[p]);
          v = _mm512_add_ps(v, beta);
          const int64_t i = (8 * c + j) * N + n0;
          if (bf16)
            _mm256_mask_storeu_epi16(ob + i, keep, to_bf16(v));
          else
            _mm512_mask_storeu_ps(of + i, keep, v);
        }
      }
    }
  }
}

inline void dequantize(const T16Weight& w, void* out, bool bf16, int64_t t0, int64_t t1) {
  if (w.cols == 4) return tiles<4>(w, out, bf16, t0, t1);
  tiles<1>(w, out, bf16, t0, t1);
}

}  // namespace DQ_NS
}  // namespace cpu
}  // namespace dbquant
