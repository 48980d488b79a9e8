// One unit of a t16 tile (byte c of plane p for the tile's 16 rows, dbgemm_t16.h) as 16 int32 lanes, read
// from either byte order, for the AVX-512 kernels that take one unit at a time (the float tables and the
// dequantization). Internal linkage: each translation unit that includes it, after its own target pragma,
// gets its own copy.

#pragma once

#include <immintrin.h>

#include <cstdint>

#include "dbgemm_t16.h"

namespace dbquant {
namespace cpu {
namespace {

// Lane r holds row r's byte in bits 0..7. COLS 1 (unit order): the 16 bytes widened, zeros above. COLS 4
// (dword rows): row r's dword of block (c / 4, p) shifted down by column c % 4, so bits 8..31 hold the
// following columns' bytes; callers read bits 0..7 only (a vpermps index reads bits 0..3; a bit test j < 8).
template <int COLS>
inline __m512i unit_lanes(const uint8_t* tp, int64_t P, int64_t c, int64_t p) {
  if constexpr (COLS == 1) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(tp + (c * P + p) * kTile)));
  } else {
    const __m512i block = _mm512_loadu_si512(tp + ((c >> 2) * P + p) * 4 * kTile);
    return _mm512_srl_epi32(block, _mm_cvtsi32_si128(int(8 * (c & 3))));
  }
}

}  // namespace
}  // namespace cpu
}  // namespace dbquant
