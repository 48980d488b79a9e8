// One 16-row unit of the integer-table kernel (dbgemm_i8lut.h) on xmm: the tail of a group that the
// wide loops leave, shared by the AVX2 and AVX-512 paths. Each ISA's translation unit includes this
// after its `#pragma GCC target`; the anonymous namespace gives every one its own copy compiled for
// its ISA (one inline symbol shared across them could be resolved to the AVX-512 build's copy and run
// on an AVX2-only CPU). Not a public header.

#pragma once

#include <immintrin.h>

#include <cstdint>

#include "dbgemm_i8lut.h"

namespace dbquant {
namespace cpu {
namespace {

// One unit (16 rows of one byte column and plane): a0 += rows 0..7, a1 += rows 8..15 (int16), from
// its 16-byte low- and high-nibble tables tl, th (E = 2, int16 tables: also the second byte tables
// tl2, th2, the codes split as S; dbgemm_i8lut.h).
template <int E, I16Split S>
inline void unit_xmm(const uint8_t* wb, const int8_t* tl, const int8_t* th, const int8_t* tl2, const int8_t* th2,
                     __m128i& a0, __m128i& a1) {
  const __m128i m4 = _mm_set1_epi8(15), ones = _mm_set1_epi8(1), z = _mm_setzero_si128();
  const __m128i b = _mm_loadu_si128((const __m128i*)wb);
  const __m128i il = _mm_and_si128(b, m4), ih = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
  const __m128i vl = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)tl), il);
  const __m128i vh = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)th), ih);
  if constexpr (E == 2 && S == I16Split::Bytes) {  // (low byte, high byte) interleaved are the int16 codes
    const __m128i wl = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)tl2), il);
    const __m128i wh = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)th2), ih);
    a0 = _mm_add_epi16(a0, _mm_add_epi16(_mm_unpacklo_epi8(vl, wl), _mm_unpacklo_epi8(vh, wh)));
    a1 = _mm_add_epi16(a1, _mm_add_epi16(_mm_unpackhi_epi8(vl, wl), _mm_unpackhi_epi8(vh, wh)));
  } else {
    // pmaddubsw adds each row's low- and high-nibble codes (TopRem: their top parts) into int16
    __m128i s0 = _mm_maddubs_epi16(ones, _mm_unpacklo_epi8(vl, vh));
    __m128i s1 = _mm_maddubs_epi16(ones, _mm_unpackhi_epi8(vl, vh));
    if constexpr (E == 2) {  // TopRem: 16 top + rem
      const __m128i r = _mm_add_epi8(_mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)tl2), il),
                                     _mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)th2), ih));
      s0 = _mm_add_epi16(_mm_slli_epi16(s0, 4), _mm_unpacklo_epi8(r, z));
      s1 = _mm_add_epi16(_mm_slli_epi16(s1, 4), _mm_unpackhi_epi8(r, z));
    }
    a0 = _mm_add_epi16(a0, s0);
    a1 = _mm_add_epi16(a1, s1);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace dbquant
