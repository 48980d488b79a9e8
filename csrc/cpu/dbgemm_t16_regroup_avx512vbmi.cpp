// Dword rows back to the unit order for one tile (UnitPlanes, dbgemm_t16.h) with one vpermb per 64-byte
// block: a 16 x 4 byte transpose. Compiled for AVX-512F/BW + VBMI by the pragma below; only called for
// the AVX-512 paths where dword_rows_supported() (the others regroup by the portable loop in
// dbgemm_t16.cpp). Through that loop the float-table AVX-512 GEMV took 3-4x its time on the unit order
// on Zen 4; through this one 1.1-1.3x (docs/RESULTS.md, "Dword rows").

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi")

#include <immintrin.h>

#include "dbgemm_t16.h"

namespace dbquant {
namespace cpu {

void regroup_dword_tile_avx512vbmi(const uint8_t* src, uint8_t* dst, int64_t blocks, int64_t P) {
  // byte 16 j + r of the result is byte 4 r + j of the block: column j's 16 rows, a unit
  alignas(64) uint8_t idx[64];
  for (int j = 0; j < 4; ++j)
    for (int r = 0; r < kTile; ++r) idx[16 * j + r] = uint8_t(4 * r + j);
  const __m512i perm = _mm512_load_si512(idx);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t p = 0; p < P; ++p) {
      const __m512i u = _mm512_permutexvar_epi8(perm, _mm512_loadu_si512(src + (b * P + p) * 64));
      uint8_t* d = dst + (4 * b * P + p) * kTile;  // unit (4 b + j, p) at ((4 b + j) P + p) 16
      _mm_storeu_si128((__m128i*)d, _mm512_castsi512_si128(u));
      _mm_storeu_si128((__m128i*)(d + P * kTile), _mm512_extracti32x4_epi32(u, 1));
      _mm_storeu_si128((__m128i*)(d + 2 * P * kTile), _mm512_extracti32x4_epi32(u, 2));
      _mm_storeu_si128((__m128i*)(d + 3 * P * kTile), _mm512_extracti32x4_epi32(u, 3));
    }
}

}  // namespace cpu
}  // namespace dbquant
