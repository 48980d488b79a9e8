// AVX-512 VNNI path of the 8-bit-activation prefill GEMM (gemm_a8.h). Per tile: the planes expanded to a
// panel of bytes {0, 1} laid out as dword rows (per 4 channels and plane, one zmm: 16 output rows x 4
// bytes), and each group's popcounts; then for each block of MR activation rows, per group: int32 sums
// that start at -z times the popcount (one vpmulld per sum), vpdpbusd of 4 broadcast activation codes of a
// row with each plane's panel vector (4 unsigned x signed byte products added into each row's int32 lane:
// 64 per instruction, no int16 stage and so no group-size limit of its own), and the float epilogue in
// gemm_a8.h's order, so the outputs are the scalar path's bit for bit. Reads the planes in either byte
// order in place (t16_unit_avx512.h). With int8_weights the planes of a group merge into one panel of
// int8 levels q = sum_p r_p b_p (gemm_a8.h), expanded by byte masks (vptestmb or, on dword rows with
// AVX512-BITALG, vpshufbitqmb; a masked move and masked adds), with each group's sum of q in place of the
// popcount and its step s in place of alpha: one vpdpbusd per 4 channels instead of P, and the same row
// blocks (P = 1). Compiled for AVX-512F/BW/VL + VNNI + FMA + F16C by the pragma; called only after a
// run-time CPU check (gemm_a8_tiles: VNNI).

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "gemm_a8.h"
#include "t16_unit_avx512.h"

namespace dbquant {
namespace cpu {

namespace {

// acc + vpdpbusd(u, s), the accumulator in place. Written out because GCC did not keep the intrinsic's
// accumulators in place: it copied each accumulator twice per step and spilled (16 vector moves per 8
// multiply-adds in the row blocks below).
inline __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
  return acc;
}

// The bits of unit c (8 channels) of plane p for the tile's 16 rows (either order: COLS) as two byte masks:
// bit 4 r + i of mask[h] is channel 8 c + 4 h + i of row r (a vpdpbusd lane's 4 channels per row).
struct UnitBits {
  __mmask64 mask[2];
};
template <int COLS>
inline UnitBits unit_bits(const uint8_t* tp, int64_t P, int64_t c, int64_t p) {
  // byte 4 r' + i of lane L comes from row 4 L + r' (each lane holds the 16 rows' bytes)
  const __m512i idx = _mm512_set_epi32(0x0F0F0F0F, 0x0E0E0E0E, 0x0D0D0D0D, 0x0C0C0C0C, 0x0B0B0B0B, 0x0A0A0A0A,
                                       0x09090909, 0x08080808, 0x07070707, 0x06060606, 0x05050505, 0x04040404,
                                       0x03030303, 0x02020202, 0x01010101, 0x00000000);
  // the unit's 16 bytes (row r's byte is bits 0..7 of lane r), in each 128-bit lane, then row r's byte in
  // bytes 4 r .. 4 r + 3
  const __m512i v = _mm512_shuffle_epi8(
      _mm512_broadcast_i32x4(_mm512_cvtepi32_epi8(unit_lanes<COLS>(tp, P, c, p))), idx);
  return {{_mm512_test_epi8_mask(v, _mm512_set1_epi32(0x08040201)),
           _mm512_test_epi8_mask(v, _mm512_set1_epi32(int(0x80402010u)))}};
}

// Tile tp's planes (either order: COLS) as bytes, panel[(s * P + p) * 64 + 4 r + i] = bit 4 s + i of row r
// in plane p (a step's P vectors contiguous); pc[(j * P + p) * 16 + r] = the popcount of row r's bits of
// plane p in group j; sc[(j * P + p) * 16 + r] = its alpha (ts) as float32.
template <int COLS>
void expand_tile(const T16Weight& w, const uint8_t* tp, const uint16_t* ts, uint8_t* panel, int32_t* pc, float* sc) {
  const int64_t P = w.P, cpg = w.group_size / 8;
  const __m512i one = _mm512_set1_epi8(1);
  for (int64_t j = 0; j < w.groups(); ++j)
    for (int64_t p = 0; p < P; ++p) {
      __m512i count = _mm512_setzero_si512();
      for (int64_t c = j * cpg; c < (j + 1) * cpg; ++c) {
        const UnitBits u = unit_bits<COLS>(tp, P, c, p);
        for (int nib = 0; nib < 2; ++nib) {
          const __m512i b = _mm512_maskz_mov_epi8(u.mask[nib], one);
          _mm512_storeu_si512(panel + ((2 * c + nib) * P + p) * 64, b);
          count = _mm512_dpbusd_epi32(count, b, one);  // + each row's 4 bits: the popcount
        }
      }
      _mm512_storeu_si512(pc + (j * P + p) * kTile, count);
      _mm512_storeu_ps(sc + (j * P + p) * kTile, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(ts + (j * P + p) * kTile))));
    }
}

// The 8-bit levels of tile rows 0..15 in group j (gemm_a8.h's w8_levels, the same float operations on 16 rows):
// the step s and each plane's r_p as a byte repeated in its row's 4 bytes (the masked adds' operand).
struct W8Group {
  __m512 s;
  __m512i r[kMaxPlanes];
};
inline W8Group w8_group_levels(const uint16_t* ts, int64_t j, int64_t P) {
  // each dword lane's low byte (r_p, two's complement) into its 4 bytes
  const __m512i rep = _mm512_set_epi32(
      0x0C0C0C0C, 0x08080808, 0x04040404, 0x00000000, 0x0C0C0C0C, 0x08080808, 0x04040404, 0x00000000,
      0x0C0C0C0C, 0x08080808, 0x04040404, 0x00000000, 0x0C0C0C0C, 0x08080808, 0x04040404, 0x00000000);
  const __m512 zero = _mm512_setzero_ps(), inf = _mm512_set1_ps(INFINITY);
  __m512 alpha[kMaxPlanes], pos = zero, neg = zero;
  __mmask16 ok = 0xffff;
  for (int64_t p = 0; p < P; ++p) {
    alpha[p] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(ts + (j * P + p) * kTile)));
    ok &= _mm512_cmp_ps_mask(_mm512_abs_ps(alpha[p]), inf, _CMP_LT_OQ);  // false for NaN and +-Inf
    pos = _mm512_add_ps(pos, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(alpha[p], zero, _CMP_GT_OQ), alpha[p]));
    neg = _mm512_add_ps(neg, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(alpha[p], zero, _CMP_LT_OQ),
                                                 _mm512_sub_ps(zero, alpha[p])));
  }
  W8Group lv;
  lv.s = _mm512_mask_blend_ps(ok, _mm512_set1_ps(NAN),
                              _mm512_div_ps(_mm512_max_ps(pos, neg), _mm512_set1_ps(127.0f - 0.5f * float(P))));
  const __mmask16 use = ok & _mm512_cmp_ps_mask(lv.s, zero, _CMP_GT_OQ);
  for (int64_t p = 0; p < P; ++p)
    lv.r[p] = _mm512_shuffle_epi8(_mm512_maskz_cvtps_epi32(use, _mm512_div_ps(alpha[p], lv.s)), rep);
  return lv;
}

// Group j's level sums (sum: int32 per row) and step into the expansion's outputs.
inline void w8_group_store(const W8Group& lv, __m512i sum, int64_t j, int32_t* pc, float* sc) {
  _mm512_storeu_si512(pc + j * kTile, sum);
  _mm512_storeu_ps(sc + j * kTile, lv.s);
}

// Tile tp's planes merged into int8 levels (gemm_a8.h, 8-bit weight levels): panel[s * 64 + 4 r + i] = q of row r,
// channel 4 s + i (expand_tile's panel with P = 1); pc[j * 16 + r] = row r's sum of q over group j; sc[j * 16 + r] =
// its step s (the row blocks then run as on one plane with alpha = s). The levels follow w8_levels on 16 rows at
// once, in the same float operations.
template <int COLS>
void expand_tile_w8(const T16Weight& w, const uint8_t* tp, const uint16_t* ts, uint8_t* panel, int32_t* pc,
                    float* sc) {
  const int64_t P = w.P, cpg = w.group_size / 8;
  const __m512i one = _mm512_set1_epi8(1);
  for (int64_t j = 0; j < w.groups(); ++j) {
    const W8Group lv = w8_group_levels(ts, j, P);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t c = j * cpg; c < (j + 1) * cpg; ++c)
      for (int nib = 0; nib < 2; ++nib) {
        __m512i q = _mm512_setzero_si512();
        for (int64_t p = 0; p < P; ++p) q = _mm512_mask_add_epi8(q, unit_bits<COLS>(tp, P, c, p).mask[nib], q, lv.r[p]);
        _mm512_storeu_si512(panel + (2 * c + nib) * 64, q);
        sum = _mm512_dpbusd_epi32(sum, one, q);  // + each row's 4 levels
      }
    w8_group_store(lv, sum, j, pc, sc);
  }
}

// expand_tile_w8 on dword rows by vpshufbitqmb (AVX512-BITALG, asked at run time: tiles), the same
// bytes: a row's dword in a 64-byte block holds its 32 channels' bits of one plane, and one vpshufbitqmb
// picks, for 4 channels, each row's 4 bits into a 64-bit mask (bit 4 r + i: bit o + i of row r's dword,
// found in qword r / 2 at 32 (r & 1)); the levels are then the masked move and adds of expand_tile_w8.
// Fewer instructions per 64 panel bytes than taking each unit through unit_lanes (a 576 x 576 call with M = 1,
// mostly expansion: 57.7 us against 64.1).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bitalg,avx2,fma,f16c")))
void expand_tile_w8_bitalg(const T16Weight& w, const uint8_t* tp, const uint16_t* ts, uint8_t* panel, int32_t* pc,
                           float* sc) {
  const int64_t P = w.P, blocks = w.group_size / kDwordGroup;  // 64-byte blocks per group and plane
  const __m512i base = _mm512_set1_epi64(0x2322212003020100LL);  // bytes 0, 1, 2, 3, 32, 33, 34, 35
  const __m512i one = _mm512_set1_epi8(1);
  for (int64_t j = 0; j < w.groups(); ++j) {
    const W8Group lv = w8_group_levels(ts, j, P);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t cb = 0; cb < blocks; ++cb) {
      const int64_t c4 = j * blocks + cb;  // the block's index along the row: channels 32 c4 .. 32 c4 + 31
      __m512i bits[kMaxPlanes];
      for (int64_t p = 0; p < P; ++p) bits[p] = _mm512_loadu_si512(tp + (c4 * P + p) * 4 * kTile);
      for (int s8 = 0; s8 < 8; ++s8) {
        const __m512i ctrl = _mm512_add_epi8(base, _mm512_set1_epi8(char(4 * s8)));
        __m512i q = _mm512_maskz_mov_epi8(_mm512_bitshuffle_epi64_mask(bits[0], ctrl), lv.r[0]);
        for (int64_t p = 1; p < P; ++p)
          q = _mm512_mask_add_epi8(q, _mm512_bitshuffle_epi64_mask(bits[p], ctrl), q, lv.r[p]);
        _mm512_storeu_si512(panel + (c4 * 8 + s8) * 64, q);
        sum = _mm512_dpbusd_epi32(sum, one, q);
      }
    }
    w8_group_store(lv, sum, j, pc, sc);
  }
}

// Rows [m, m + MR) of tile t: y[(m + mr) N + n0 + r] for the tile's rows r < `rows`, bias added.
template <int MR, int P>
void row_block(const T16Weight& w, int64_t t, const uint8_t* panel, const int32_t* pc, const float* sc, const uint8_t* xu,
               const int32_t* xz, const float* sx, const float* xs, int64_t m, float* y) {
  const int64_t G = w.groups(), S = w.group_size / 4, Kp = w.kp(), N = w.N, n0 = t * kTile;
  const uint16_t* to = tile_ptrs(w, t).offset;
  __m512 acc_y[MR];
  for (int mr = 0; mr < MR; ++mr) acc_y[mr] = _mm512_setzero_ps();
  const uint8_t* x0 = xu + m * Kp;
  for (int64_t j = 0; j < G; ++j) {
    __m512i acc[MR][P];  // int32: the sum of (code - z) over the set bits starts at -z popcount
    for (int p = 0; p < P; ++p) {
      const __m512i count = _mm512_loadu_si512(pc + (j * P + p) * kTile);
      for (int mr = 0; mr < MR; ++mr)
        acc[mr][p] = _mm512_mullo_epi32(count, _mm512_set1_epi32(-xz[(m + mr) * G + j]));
    }
    const uint8_t* wp = panel + j * S * P * 64;
    const uint8_t* xp = x0 + j * S * 4;
    for (int64_t s = 0; s < S; ++s, wp += P * 64, xp += 4) {
      __m512i xb[MR];
      for (int mr = 0; mr < MR; ++mr) {
        int32_t v;
        std::memcpy(&v, xp + mr * Kp, 4);
        xb[mr] = _mm512_set1_epi32(v);
      }
      for (int p = 0; p < P; ++p) {
        const __m512i wv = _mm512_loadu_si512(wp + p * 64);
        for (int mr = 0; mr < MR; ++mr) acc[mr][p] = dpbusd(acc[mr][p], xb[mr], wv);
      }
    }
    __m512 a[P];
    for (int p = 0; p < P; ++p) a[p] = _mm512_loadu_ps(sc + (j * P + p) * kTile);
    const __m512 beta = to ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(to + j * kTile))) : _mm512_setzero_ps();
    for (int mr = 0; mr < MR; ++mr) {
      __m512 part = _mm512_mul_ps(a[0], _mm512_cvtepi32_ps(acc[mr][0]));
      for (int p = 1; p < P; ++p) part = _mm512_fmadd_ps(a[p], _mm512_cvtepi32_ps(acc[mr][p]), part);
      acc_y[mr] = _mm512_fmadd_ps(part, _mm512_set1_ps(sx[(m + mr) * G + j]), acc_y[mr]);
      if (to) acc_y[mr] = _mm512_fmadd_ps(beta, _mm512_set1_ps(xs[(m + mr) * G + j]), acc_y[mr]);
    }
  }
  const int rows = int(std::min<int64_t>(kTile, N - n0));
  const __mmask16 keep = rows == kTile ? __mmask16(0xffff) : __mmask16((1u << rows) - 1);
  for (int mr = 0; mr < MR; ++mr) {
    __m512 v = acc_y[mr];
    if (w.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(keep, w.bias + n0));
    _mm512_mask_storeu_ps(y + (m + mr) * N + n0, keep, v);
  }
}

// Every row of tile t in blocks of MR (P <= 2: 8 rows, 2 P + 8 + P of the 32 registers; else 4), the
// last block row by row.
template <int P>
void tile_rows(const T16Weight& w, int64_t t, const uint8_t* panel, const int32_t* pc, const float* sc,
               const uint8_t* xu, const int32_t* xz, const float* sx, const float* xs, int64_t M, float* y) {
  constexpr int MR = P <= 2 ? 8 : 4;
  int64_t m = 0;
  for (; m + MR <= M; m += MR) row_block<MR, P>(w, t, panel, pc, sc, xu, xz, sx, xs, m, y);
  for (; m < M; ++m) row_block<1, P>(w, t, panel, pc, sc, xu, xz, sx, xs, m, y);
}

template <int COLS>
void tiles(const T16Weight& w, const uint8_t* xu, const int32_t* xz, const float* sx, const float* xs, int64_t M,
           float* y, uint8_t* scratch, int64_t t0, int64_t t1, bool int8_weights) {
  const int64_t P = int8_weights ? 1 : w.P;  // the levels are one plane
  uint8_t* panel = scratch;
  int32_t* pc = reinterpret_cast<int32_t*>(scratch + w.kp() * P * kTile);
  float* sc = reinterpret_cast<float*>(pc + w.groups() * P * kTile);
  const bool bitalg = avx512_has(Avx512Ext::Bitalg);
  for (int64_t t = t0; t < t1; ++t) {
    const auto [tp, ts, to] = tile_ptrs(w, t);
    if (int8_weights) {
      if (COLS == 4 && bitalg) expand_tile_w8_bitalg(w, tp, ts, panel, pc, sc);
      else expand_tile_w8<COLS>(w, tp, ts, panel, pc, sc);
      tile_rows<1>(w, t, panel, pc, sc, xu, xz, sx, xs, M, y);
      continue;
    }
    expand_tile<COLS>(w, tp, ts, panel, pc, sc);
    switch (w.P) {  // one instance per plane count: the accumulators are registers
      case 1: tile_rows<1>(w, t, panel, pc, sc, xu, xz, sx, xs, M, y); break;
      case 2: tile_rows<2>(w, t, panel, pc, sc, xu, xz, sx, xs, M, y); break;
      case 3: tile_rows<3>(w, t, panel, pc, sc, xu, xz, sx, xs, M, y); break;
      default: tile_rows<4>(w, t, panel, pc, sc, xu, xz, sx, xs, M, y); break;
    }
  }
}

}  // namespace

void gemm_a8_tiles_avx512vnni(const T16Weight& w, const uint8_t* xu, const int32_t* xz, const float* sx,
                              const float* xs, int64_t M, float* y, uint8_t* scratch, int64_t t0, int64_t t1,
                              bool int8_weights) {
  if (w.cols == 4) return tiles<4>(w, xu, xz, sx, xs, M, y, scratch, t0, t1, int8_weights);
  tiles<1>(w, xu, xz, sx, xs, M, y, scratch, t0, t1, int8_weights);
}

}  // namespace cpu
}  // namespace dbquant
