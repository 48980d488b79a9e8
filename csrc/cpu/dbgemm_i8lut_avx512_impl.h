// The AVX-512 paths of the integer lookup-table kernel (dbgemm_i8lut.h for tables, order and bound),
// included by two translation units, each compiled for its ISA by its own pragma:
//   dbgemm_i8lut_avx512.cpp      (AVX-512F/BW)   I8_VBMI 0: tables expanded to the weight's byte
//                                order, looked up in-lane by vpshufb zmm;
//   dbgemm_i8lut_avx512vbmi.cpp  (+ AVX-512VBMI) I8_VBMI 1: compact tables, 32 bytes per byte column
//                                (the low-nibble table, then the high-nibble one), looked up across
//                                lanes by vpermb (a zmm spanning <= 2 columns, P >= 2) or vpermi2b
//                                (4 columns, P = 1), the column of each lane added to the nibble.
//   dbgemm_i8lut_avx512dw.cpp    (+ VBMI + VNNI)  I8_DW 1: weights in dword rows (dbgemm_t16.h,
//                                cols 4) and dword tables; see "Dword rows" below.
// Everything else (the group's float epilogue, group_epilogue; for the first two also the accumulation
// and reduction) is the same code, so all three give the scalar path's results bit for bit.
//
// Dword rows. A 64-byte block of weights holds 4 byte columns of one plane for 16 rows, row r's 4
// bytes in dword r. A row's tables (I8LutRow::dw) hold, per block b of 4 columns, 2 nibbles x E
// bytes x 64: entry 16 j + i of (nibble h, byte e) is byte e of code t_{2(4b+j)+h}[i] (E = 1: the
// int8 code; E = 2: e = 0 the low byte t & 255, read unsigned, e = 1 the high byte t >> 8, signed).
// One vpermb looks 64 nibbles up at once (index: nibble | 16 j, j the byte's column in its dword),
// and vpdpbusd adds each row's 4 looked-up bytes into its int32 lane: unsigned low bytes times 1
// into L, 1 times the signed bytes into H, and S = L + 256 H is the int16 codes' sum: the same
// integer S_pj as on every path, with no int16 segment and no reduction across lanes (the 16 lanes
// are the 16 rows). 4 vpermb + 4 vpdpbusd per 64 weight bytes at E = 2 (2 + 2 at E = 1), against
// 4 vpshufb + 4 unpacks + 4 adds: +25-31% in a microbenchmark in L2 (docs/RESULTS.md, "Dword rows").
// One zmm holds 4 consecutive 16-byte units (c, p) of a tile's weight bytes, i.e. 64 lookups per
// instruction. Unit i of a segment (relative to its first byte column) belongs to plane i % P; lane
// j of the v-th zmm of a step is unit 4v + j, so with P = 3 the plane of a lane depends on v mod 3
// and the step covers 3 zmm (4 byte columns) with one int16 accumulator per phase v. int16 tables are
// split Bytes here (dbgemm_i8lut.h, "int16 tables": measured faster on this path).
// Needs I8_NS (the namespace of this copy), I8_VBMI and I8_DW defined before inclusion.

#include <immintrin.h>

#include <algorithm>

#include "dbgemm_i8lut.h"
#include "dbgemm_i8lut_unit.h"
#include "prefetch.h"

namespace dbquant {
namespace cpu {
namespace I8_NS {

constexpr int gcd_c(int a, int b) { return b ? gcd_c(b, a % b) : a; }

#if I8_VBMI
// Byte column (relative to the zmm's first) of each lane of the v-th zmm of a step, times 32: the
// offset of that column's tables in the compact row.
template <int P>
inline __m512i lane_base(int v) {
  int b[4];
  for (int j = 0; j < 4; ++j) b[j] = 32 * ((4 * v + j) / P - (4 * v) / P);
  return _mm512_setr_epi32(b[0] * 0x01010101, b[0] * 0x01010101, b[0] * 0x01010101, b[0] * 0x01010101,
                           b[1] * 0x01010101, b[1] * 0x01010101, b[1] * 0x01010101, b[1] * 0x01010101,
                           b[2] * 0x01010101, b[2] * 0x01010101, b[2] * 0x01010101, b[2] * 0x01010101,
                           b[3] * 0x01010101, b[3] * 0x01010101, b[3] * 0x01010101, b[3] * 0x01010101);
}
#endif

// The group scales are a second stream beside the planes: prefetched the same distance ahead, each cache
// line of group g's P x 16 float16 (one line at P <= 2, two at P = 3, 4), and the offset's.
template <int P>
inline void prefetch_group(const uint16_t* ts, const uint16_t* to, int64_t g) {
  for (int b = 0; b < P * kTile * 2; b += 64) prefetch_ahead_l2(reinterpret_cast<const char*>(ts + g * P * kTile) + b);
  if (to) prefetch_ahead_l2(to + g * kTile);
}

// Group g's float epilogue (dbgemm_i8lut.h, in its order) on the planes' int32 sums S[p]: every copy's.
template <int P>
inline __m512 group_epilogue(const I8LutRow& row, const uint16_t* ts, const uint16_t* to, int64_t g, const __m512i* S,
                             __m512 y) {
  const __m512 s = _mm512_set1_ps(row.scale[g]), h = _mm512_set1_ps(0.5f * row.gsum[g]);  // the centring's term
  for (int p = 0; p < P; ++p) {
    const __m512 a = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(ts + (g * P + p) * kTile)));
    y = _mm512_fmadd_ps(a, _mm512_fmadd_ps(_mm512_cvtepi32_ps(S[p]), s, h), y);
  }
  if (to) {
    const __m512 beta = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(to + g * kTile)));
    y = _mm512_fmadd_ps(beta, _mm512_set1_ps(row.gsum[g]), y);
  }
  return y;
}

#if I8_DW

// y (16 rows) of one activation row and tile (tp: its planes in dword rows). E: bytes per table entry.
template <int P, int E>
inline __m512 tile_row(const T16Weight& w, const I8LutRow& row, const uint8_t* tp, const uint16_t* ts,
                       const uint16_t* to) {
  const int64_t G = w.groups(), bpg = w.group_size / kDwordGroup;  // 4-column blocks per group
  const __m512i m4 = _mm512_set1_epi8(15), ones = _mm512_set1_epi8(1);
  const __m512i col = _mm512_set1_epi32(0x30201000);  // 16 j in byte j of each dword
  __m512 y = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    prefetch_group<P>(ts, to, g);
    __m512i L[P], H[P];  // per plane, int32 per row: sums of unsigned low bytes (E = 2) and of signed bytes
    for (int p = 0; p < P; ++p) L[p] = H[p] = _mm512_setzero_si512();
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      const int8_t* t = row.dw + b * 128 * E;
      __m512i tab[2][E];  // [nibble][byte]
      for (int h = 0; h < 2; ++h)
        for (int e = 0; e < E; ++e) tab[h][e] = _mm512_loadu_si512(t + (h * E + e) * 64);
      for (int p = 0; p < P; ++p) {
        const uint8_t* wb = tp + (b * P + p) * 64;
        const __m512i v = _mm512_loadu_si512(wb);
        prefetch_ahead_l2(wb);
        // 0xEA: (v & m4) | col, the nibble plus 16 x its column
        const __m512i il = _mm512_ternarylogic_epi32(v, m4, col, 0xEA);
        const __m512i ih = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), m4, col, 0xEA);
        if constexpr (E == 2) {
          L[p] = _mm512_dpbusd_epi32(L[p], _mm512_permutexvar_epi8(il, tab[0][0]), ones);
          H[p] = _mm512_dpbusd_epi32(H[p], ones, _mm512_permutexvar_epi8(il, tab[0][1]));
          L[p] = _mm512_dpbusd_epi32(L[p], _mm512_permutexvar_epi8(ih, tab[1][0]), ones);
          H[p] = _mm512_dpbusd_epi32(H[p], ones, _mm512_permutexvar_epi8(ih, tab[1][1]));
        } else {
          H[p] = _mm512_dpbusd_epi32(H[p], ones, _mm512_permutexvar_epi8(il, tab[0][0]));
          H[p] = _mm512_dpbusd_epi32(H[p], ones, _mm512_permutexvar_epi8(ih, tab[1][0]));
        }
      }
    }
    __m512i S[P];
    for (int p = 0; p < P; ++p) S[p] = E == 2 ? _mm512_add_epi32(L[p], _mm512_slli_epi32(H[p], 8)) : H[p];
    y = group_epilogue<P>(row, ts, to, g, S, y);
  }
  return y;
}
#else
// E: bytes per table entry (1: int8 tables, 2: int16 tables; the VBMI copy is built for 1 only).
template <int P, int E>
inline __m512 tile_row(const T16Weight& w, const I8LutRow& row, const uint8_t* tp, const uint16_t* ts,
                       const uint16_t* to) {
  constexpr int W = 4, NPH = P / gcd_c(W, P);  // lanes per zmm; accumulator phases
  constexpr int64_t SEG = lut_segment_cols(lut_kind_for(E));
#if I8_VBMI
  static_assert(E == 1, "the VBMI lookups read compact int8 tables only");
#endif
  const int64_t G = w.groups(), cpg = w.group_size / 8;
  const __m512i m4 = _mm512_set1_epi8(15), ones = _mm512_set1_epi8(1);
#if I8_VBMI
  __m512i blo[NPH], bhi[NPH];
  for (int v = 0; v < NPH; ++v) {
    blo[v] = lane_base<P>(v);
    bhi[v] = _mm512_add_epi8(blo[v], _mm512_set1_epi8(16));
  }
#endif
  __m512 y = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    prefetch_group<P>(ts, to, g);
    __m512i S[P];
    for (int p = 0; p < P; ++p) S[p] = _mm512_setzero_si512();
    for (int64_t c0 = g * cpg; c0 < (g + 1) * cpg; c0 += SEG) {
      const int64_t c1 = std::min((g + 1) * cpg, c0 + SEG), n = (c1 - c0) * P, off0 = c0 * P * kTile;
      const uint8_t* wb = tp + off0;
      __m512i acc[NPH][2];
      for (int v = 0; v < NPH; ++v) acc[v][0] = acc[v][1] = _mm512_setzero_si512();
      int64_t i = 0;
      for (; i + W * NPH <= n; i += W * NPH) {
        for (int v = 0; v < NPH; ++v) {
          const int64_t o = (i + W * v) * kTile;
          const __m512i b = _mm512_loadu_si512(wb + o);
          prefetch_ahead_l2(wb + o);
#if I8_VBMI
          // 0xEA: (b & m4) | base, the lane's column offset added to its nibble
          const int8_t* t = row.cpt + (c0 + (i + W * v) / P) * 32;
          const __m512i il = _mm512_ternarylogic_epi32(b, m4, blo[v], 0xEA);
          const __m512i ih = _mm512_ternarylogic_epi32(_mm512_srli_epi16(b, 4), m4, bhi[v], 0xEA);
          __m512i vl, vh;
          if constexpr (P == 1) {  // 4 columns, 128 bytes of tables
            const __m512i t0 = _mm512_loadu_si512(t), t1 = _mm512_loadu_si512(t + 64);
            vl = _mm512_permutex2var_epi8(t0, il, t1);
            vh = _mm512_permutex2var_epi8(t0, ih, t1);
          } else {  // at most 2 columns, 64 bytes
            const __m512i t0 = _mm512_loadu_si512(t);
            vl = _mm512_permutexvar_epi8(il, t0);
            vh = _mm512_permutexvar_epi8(ih, t0);
          }
#else
          const __m512i il = _mm512_and_si512(b, m4), ih = _mm512_and_si512(_mm512_srli_epi16(b, 4), m4);
          const __m512i vl = _mm512_shuffle_epi8(_mm512_loadu_si512(row.lo + off0 + o), il);
          const __m512i vh = _mm512_shuffle_epi8(_mm512_loadu_si512(row.hi + off0 + o), ih);
          if constexpr (E == 2) {  // (low byte, high byte) interleaved are the int16 codes
            const __m512i wl = _mm512_shuffle_epi8(_mm512_loadu_si512(row.lo2 + off0 + o), il);
            const __m512i wh = _mm512_shuffle_epi8(_mm512_loadu_si512(row.hi2 + off0 + o), ih);
            acc[v][0] = _mm512_add_epi16(acc[v][0],
                                         _mm512_add_epi16(_mm512_unpacklo_epi8(vl, wl), _mm512_unpacklo_epi8(vh, wh)));
            acc[v][1] = _mm512_add_epi16(acc[v][1],
                                         _mm512_add_epi16(_mm512_unpackhi_epi8(vl, wl), _mm512_unpackhi_epi8(vh, wh)));
          }
#endif
          if constexpr (E == 1) {  // pmaddubsw adds each row's low- and high-nibble codes into int16
            acc[v][0] = _mm512_add_epi16(acc[v][0], _mm512_maddubs_epi16(ones, _mm512_unpacklo_epi8(vl, vh)));
            acc[v][1] = _mm512_add_epi16(acc[v][1], _mm512_maddubs_epi16(ones, _mm512_unpackhi_epi8(vl, vh)));
          }
        }
      }
      if constexpr (W % P == 0) {
        // lane j holds plane j % P: fold the lanes of one plane together (P = 1, 2), then
        // pair each plane's rows 0..7 (acc[0][0]) with its rows 8..15 (acc[0][1])
        __m512i a0 = acc[0][0], a1 = acc[0][1];
        if (P == 1) {
          a0 = _mm512_add_epi16(a0, _mm512_shuffle_i64x2(a0, a0, _MM_SHUFFLE(1, 0, 3, 2)));
          a1 = _mm512_add_epi16(a1, _mm512_shuffle_i64x2(a1, a1, _MM_SHUFFLE(1, 0, 3, 2)));
          a0 = _mm512_add_epi16(a0, _mm512_shuffle_i64x2(a0, a0, _MM_SHUFFLE(2, 3, 0, 1)));
          a1 = _mm512_add_epi16(a1, _mm512_shuffle_i64x2(a1, a1, _MM_SHUFFLE(2, 3, 0, 1)));
        }
        __m512i z01 = _mm512_permutex2var_epi64(a0, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), a1);
        if (P == 2)  // lanes 2, 3 hold planes 0, 1 again: paired the same way and added
          z01 = _mm512_add_epi16(z01, _mm512_permutex2var_epi64(a0, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), a1));
        S[0] = _mm512_add_epi32(S[0], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(z01)));
        if (P >= 2) S[1 % P] = _mm512_add_epi32(S[1 % P], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(z01, 1)));
        if (P == 4) {
          const __m512i z23 = _mm512_permutex2var_epi64(a0, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), a1);
          S[2 % P] = _mm512_add_epi32(S[2 % P], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(z23)));
          S[3 % P] = _mm512_add_epi32(S[3 % P], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(z23, 1)));
        }
      }
      if (W % P != 0 || i < n) {  // the lanes of P = 3, or a short group's tail (on xmm)
        __m128i ps[P][2];  // per plane: int16 sums of rows 0..7, 8..15
        for (int p = 0; p < P; ++p) ps[p][0] = ps[p][1] = _mm_setzero_si128();
        for (; i < n; ++i) {
#if I8_VBMI
          const int8_t* t = row.cpt + (c0 + i / P) * 32;
          unit_xmm<1, I16Split::Bytes>(wb + i * kTile, t, t + 16, nullptr, nullptr, ps[i % P][0], ps[i % P][1]);
#else
          const int64_t u = off0 + i * kTile;
          unit_xmm<E, I16Split::Bytes>(wb + i * kTile, row.lo + u, row.hi + u, E == 2 ? row.lo2 + u : nullptr,
                                       E == 2 ? row.hi2 + u : nullptr, ps[i % P][0], ps[i % P][1]);
#endif
        }
        if constexpr (W % P != 0)
          for (int v = 0; v < NPH; ++v)
            for (int h = 0; h < 2; ++h) {
              const __m128i L[W] = {_mm512_castsi512_si128(acc[v][h]), _mm512_extracti32x4_epi32(acc[v][h], 1),
                                    _mm512_extracti32x4_epi32(acc[v][h], 2), _mm512_extracti32x4_epi32(acc[v][h], 3)};
              for (int j = 0; j < W; ++j) ps[(W * v + j) % P][h] = _mm_add_epi16(ps[(W * v + j) % P][h], L[j]);
            }
        for (int p = 0; p < P; ++p)
          S[p] = _mm512_add_epi32(S[p], _mm512_cvtepi16_epi32(_mm256_set_m128i(ps[p][1], ps[p][0])));
      }
    }
    y = group_epilogue<P>(row, ts, to, g, S, y);
  }
  return y;
}
#endif

template <int P, int E>
void tiles(const T16Weight& w, const uint8_t* buf, int64_t M, float* y, int64_t t0, int64_t t1) {
  constexpr LutKind kind = lut_kind_for(E);
  I8LutRow views[kI8RowViews];
  i8lut_rows(w, buf, M, kind, views);
#if !I8_DW
  UnitPlanes units(w);
#endif
  for (int64_t t = t0; t < t1; ++t) {
#if I8_DW
    const auto [tp, ts, to] = tile_ptrs(w, t);  // dword rows, read as they are
#else
    const auto [tp, ts, to] = units.ptrs(t);
#endif
    const int64_t n0 = t * kTile;
    const int rows = int(std::min<int64_t>(kTile, w.N - n0));
    const __mmask16 keep = rows == kTile ? __mmask16(0xffff) : __mmask16((1u << rows) - 1);
    for (int64_t m = 0; m < M; ++m) {
      const I8LutRow row = m < kI8RowViews ? views[m] : i8lut_row(w, const_cast<uint8_t*>(buf), m, kind);
      __m512 v = tile_row<P, E>(w, row, tp, ts, to);
      if (w.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(keep, w.bias + n0));
      _mm512_mask_storeu_ps(y + m * w.N + n0, keep, v);
    }
  }
}

// The 16 centred partial sums C_q of chunk q (dbgemm_i8lut.h), in the scalar build's order: lane i
// adds x[4q + j] when bit j of i is set; lane 15, which adds all four, is chunk_sum's T_q[15], so
// h_q = 0.5 T_q[15] comes from the register itself.
inline __m512 chunk_table(const float* xr, int64_t K, int64_t q) {
  const __mmask16 bit[4] = {0xAAAA, 0xCCCC, 0xF0F0, 0xFF00};
  __m512 t = _mm512_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    const float v = 4 * q + j < K ? xr[4 * q + j] : 0.0f;
    t = _mm512_mask_add_ps(t, bit[j], t, _mm512_set1_ps(v));
  }
  const __m512 h = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_set1_epi32(15), t), _mm512_set1_ps(0.5f));
  return _mm512_sub_ps(t, h);
}

template <int E>
inline void build_rows(const T16Weight& w, const float* x, uint8_t* buf, int64_t m0, int64_t m1, int64_t j0,
                       int64_t j1) {
  constexpr LutKind kind = lut_kind_for(E);
  constexpr float top = float(lut_code_max(kind));
  const int64_t K = w.K, g = w.group_size, nq = g / 4;
  const bool keep = nq <= kBuildChunks;
  alignas(64) float kept[kBuildChunks * 16];
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * K;
    const I8LutRow row = i8lut_row(w, buf, m, kind);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t q0 = j * nq;
      __m512 vmax = _mm512_setzero_ps();
      for (int64_t i = 0; i < nq; ++i) {
        const __m512 t = chunk_table(xr, K, q0 + i);
        if (keep) _mm512_store_ps(kept + 16 * i, t);
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(t));
      }
      const float mx = _mm512_reduce_max_ps(vmax);
      const float inv = mx > 0.0f ? top / mx : 0.0f;
      row.scale[j] = mx / top;
      row.gsum[j] = group_sum(xr, K, j, g);
      const __m512 vinv = _mm512_set1_ps(inv);
      auto code = [&](int64_t i) {  // chunk q0 + i's 16 codes, int32
        const __m512 t = keep ? _mm512_load_ps(kept + 16 * i) : chunk_table(xr, K, q0 + i);
        // vcvtps2dq rounds half to even (the default MXCSR mode), as nearbyint does in the scalar build
        return _mm512_cvtps_epi32(_mm512_mul_ps(t, vinv));
      };
      for (int64_t i = 0; i < nq; i += 2) {
        const int64_t c = (q0 + i) / 2;
        const __m512i lo = code(i), hi = code(i + 1);
        // vpmovdb keeps each code's low byte: the int8 code itself (|code| <= 127), or the int16 code's
        // low byte; its high byte (code >> 8) goes to lo2 / hi2
        const __m128i lo8 = _mm512_cvtepi32_epi8(lo), hi8 = _mm512_cvtepi32_epi8(hi);
#if I8_VBMI
        _mm_storeu_si128((__m128i*)(row.cpt + c * 32), lo8);
        _mm_storeu_si128((__m128i*)(row.cpt + c * 32 + 16), hi8);
#elif I8_DW
        // block c / 4, column c % 4: (nibble h, byte e) at (h E + e) 64 + 16 (c % 4)
        int8_t* d = row.dw + (c / 4) * 128 * E + 16 * (c % 4);
        _mm_storeu_si128((__m128i*)d, lo8);
        _mm_storeu_si128((__m128i*)(d + 64 * E), hi8);
        if constexpr (E == 2) {
          _mm_storeu_si128((__m128i*)(d + 64), _mm512_cvtepi32_epi8(_mm512_srai_epi32(lo, 8)));
          _mm_storeu_si128((__m128i*)(d + 192), _mm512_cvtepi32_epi8(_mm512_srai_epi32(hi, 8)));
        }
#else
        for (int64_t p = 0, P = w.P; p < P; ++p) {
          _mm_storeu_si128((__m128i*)(row.lo + (c * P + p) * kTile), lo8);
          _mm_storeu_si128((__m128i*)(row.hi + (c * P + p) * kTile), hi8);
        }
        if constexpr (E == 2) {
          const __m128i lo_h = _mm512_cvtepi32_epi8(_mm512_srai_epi32(lo, 8));
          const __m128i hi_h = _mm512_cvtepi32_epi8(_mm512_srai_epi32(hi, 8));
          for (int64_t p = 0, P = w.P; p < P; ++p) {
            _mm_storeu_si128((__m128i*)(row.lo2 + (c * P + p) * kTile), lo_h);
            _mm_storeu_si128((__m128i*)(row.hi2 + (c * P + p) * kTile), hi_h);
          }
        }
#endif
      }
    }
  }
}

template <int E>
inline void gemm_rows(const T16Weight& w, const uint8_t* buf, int64_t M, float* y, int64_t t0, int64_t t1) {
  switch (w.P) {
    case 1: return tiles<1, E>(w, buf, M, y, t0, t1);
    case 2: return tiles<2, E>(w, buf, M, y, t0, t1);
    case 3: return tiles<3, E>(w, buf, M, y, t0, t1);
    default: return tiles<4, E>(w, buf, M, y, t0, t1);
  }
}

}  // namespace I8_NS
}  // namespace cpu
}  // namespace dbquant
