// AVX2 path of the 8-bit-activation prefill GEMM (gemm_a8.h). Per tile: the planes expanded to a panel of
// bytes {0, 1} and the groups' popcounts (once), then for each half tile (8 output rows, one 8-lane
// vector) and each block of up to 4 activation rows, per group: vpmaddubsw of 4 broadcast activation
// codes of a row with each plane's panel bytes, int16 sums over the group, one vpmaddwd to int32 per
// plane less the row's zero point times the popcount, and the float epilogue in gemm_a8.h's order. A half
// tile's panel (2 P Kp bytes) stays in L1 while every activation row passes over it.
// Compiled for AVX2 + FMA + F16C by the pragma; called only after a run-time CPU check.

#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "gemm_a8.h"

namespace dbquant {
namespace cpu {

namespace {

// Bits set in each byte (a nibble table looked up twice).
inline __m128i popcount_bytes(__m128i v) {
  const __m128i table = _mm_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m128i low = _mm_set1_epi8(0x0F);
  return _mm_add_epi8(_mm_shuffle_epi8(table, _mm_and_si128(v, low)),
                      _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(v, 4), low)));
}

// Tile t's planes as bytes, panel[(((h * Kp/4 + s) * P + p) * 8 + r) * 4 + i] = bit 4 s + i of row 8 h + r
// in plane p (each half tile's bytes contiguous); pc[(j * P + p) * 16 + r] = the popcount of row r's bits
// of plane p in group j.
void expand_tile(const T16Weight& w, int64_t t, uint8_t* panel, int32_t* pc) {
  const int64_t P = w.P, S = w.kp() / 4, cpg = w.group_size / 8;
  const uint8_t* tp = tile_ptrs(w, t).planes;
  // byte 4 r' + i of a half's vector comes from row 8 h + r' (both lanes hold the 16 rows' bytes)
  const __m256i idx[2] = {_mm256_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3,
                                           4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7),
                          _mm256_setr_epi8(8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11,
                                           12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15)};
  const __m256i bits[2] = {_mm256_set1_epi32(0x08040201), _mm256_set1_epi32(int(0x80402010u))};
  const __m256i one = _mm256_set1_epi8(1);
  for (int64_t j = 0; j < w.groups(); ++j)
    for (int64_t p = 0; p < P; ++p) {
      __m256i count[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};  // rows 0..7, 8..15
      for (int64_t c = j * cpg; c < (j + 1) * cpg; ++c) {
        const __m128i v16 = _mm_loadu_si128((const __m128i*)(tp + (c * P + p) * kTile));
        const __m128i n = popcount_bytes(v16);
        count[0] = _mm256_add_epi32(count[0], _mm256_cvtepu8_epi32(n));
        count[1] = _mm256_add_epi32(count[1], _mm256_cvtepu8_epi32(_mm_srli_si128(n, 8)));
        const __m256i v = _mm256_broadcastsi128_si256(v16);
        for (int nib = 0; nib < 2; ++nib)
          for (int h = 0; h < 2; ++h) {
            const __m256i b = _mm256_min_epu8(_mm256_and_si256(_mm256_shuffle_epi8(v, idx[h]), bits[nib]), one);
            _mm256_store_si256((__m256i*)(panel + ((h * S + 2 * c + nib) * P + p) * 32), b);
          }
      }
      for (int h = 0; h < 2; ++h)
        _mm256_storeu_si256((__m256i*)(pc + (j * P + p) * kTile + 8 * h), count[h]);
    }
}

// Rows [m, m + MR) of one half tile (output rows 16 t + 8 h ..): out[mr * ldo + 0..7] = y before the bias.
template <int MR, int P>
void half_block(const T16Weight& w, int64_t t, int h, const uint8_t* panel, const int32_t* pc, const uint8_t* xu,
                const int32_t* xz, const float* sx, const float* xs, int64_t m, float* out, int64_t ldo) {
  const int64_t G = w.groups(), S = w.group_size / 4, Kp = w.kp();
  const auto [tp, ts, to] = tile_ptrs(w, t);
  const __m256i ones16 = _mm256_set1_epi16(1);
  __m256 y[MR];
  for (int mr = 0; mr < MR; ++mr) y[mr] = _mm256_setzero_ps();
  const uint8_t* x0 = xu + m * Kp;
  for (int64_t j = 0; j < G; ++j) {
    __m256i acc[MR][P];
    for (int mr = 0; mr < MR; ++mr)
      for (int p = 0; p < P; ++p) acc[mr][p] = _mm256_setzero_si256();
    const uint8_t* wp = panel + (h * Kp / 4 + j * S) * P * 32;
    const uint8_t* xp = x0 + j * S * 4;
    for (int64_t s = 0; s < S; ++s, wp += P * 32, xp += 4) {
      __m256i xb[MR];
      for (int mr = 0; mr < MR; ++mr) {
        int32_t v;
        std::memcpy(&v, xp + mr * Kp, 4);
        xb[mr] = _mm256_set1_epi32(v);
      }
      for (int p = 0; p < P; ++p) {
        const __m256i wv = _mm256_load_si256((const __m256i*)(wp + p * 32));
        for (int mr = 0; mr < MR; ++mr) acc[mr][p] = _mm256_add_epi16(acc[mr][p], _mm256_maddubs_epi16(xb[mr], wv));
      }
    }
    __m256 a[P];
    __m256i count[P];
    for (int p = 0; p < P; ++p) {
      a[p] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(ts + (j * P + p) * kTile + 8 * h)));
      count[p] = _mm256_loadu_si256((const __m256i*)(pc + (j * P + p) * kTile + 8 * h));
    }
    const __m256 beta = to ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(to + j * kTile + 8 * h)))
                           : _mm256_setzero_ps();
    for (int mr = 0; mr < MR; ++mr) {
      const __m256i z = _mm256_set1_epi32(xz[(m + mr) * G + j]);
      __m256 part = _mm256_setzero_ps();
      for (int p = 0; p < P; ++p) {
        const __m256i zc = _mm256_mullo_epi32(count[p], z);
        const __m256 d = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_madd_epi16(acc[mr][p], ones16), zc));
        part = p == 0 ? _mm256_mul_ps(a[0], d) : _mm256_fmadd_ps(a[p], d, part);
      }
      y[mr] = _mm256_fmadd_ps(part, _mm256_set1_ps(sx[(m + mr) * G + j]), y[mr]);
      if (to) y[mr] = _mm256_fmadd_ps(beta, _mm256_set1_ps(xs[(m + mr) * G + j]), y[mr]);
    }
  }
  for (int mr = 0; mr < MR; ++mr) _mm256_storeu_ps(out + mr * ldo, y[mr]);
}

template <int P>
void tile_rows(const T16Weight& w, int64_t t, const uint8_t* panel, const int32_t* pc, const uint8_t* xu,
               const int32_t* xz, const float* sx, const float* xs, int64_t M, float* y) {
  const int64_t N = w.N, n0 = t * kTile;
  const bool whole = n0 + kTile <= N;
  alignas(32) float part[4 * kTile];  // the last, partial tile: its rows < N copied out
  for (int h = 0; h < 2 && n0 + 8 * h < N; ++h)
    for (int64_t m = 0; m < M; m += 4) {
      const int mr = int(std::min<int64_t>(4, M - m));
      float* out = whole ? y + m * N + n0 + 8 * h : part;
      const int64_t ldo = whole ? N : kTile;
      switch (mr) {
        case 4: half_block<4, P>(w, t, h, panel, pc, xu, xz, sx, xs, m, out, ldo); break;
        case 3: half_block<3, P>(w, t, h, panel, pc, xu, xz, sx, xs, m, out, ldo); break;
        case 2: half_block<2, P>(w, t, h, panel, pc, xu, xz, sx, xs, m, out, ldo); break;
        default: half_block<1, P>(w, t, h, panel, pc, xu, xz, sx, xs, m, out, ldo); break;
      }
      if (!whole)
        for (int i = 0; i < mr; ++i)
          for (int r = 0; r < 8 && n0 + 8 * h + r < N; ++r) y[(m + i) * N + n0 + 8 * h + r] = part[i * kTile + r];
    }
  if (w.bias)
    for (int64_t m = 0; m < M; ++m)
      for (int r = 0; r < kTile && n0 + r < N; ++r) y[m * N + n0 + r] += w.bias[n0 + r];
}

}  // namespace

void gemm_a8_tiles_avx2(const T16Weight& w, const uint8_t* xu, const int32_t* xz, const float* sx,
                        const float* xs, int64_t M, float* y, uint8_t* scratch, int64_t t0, int64_t t1) {
  uint8_t* panel = scratch;
  int32_t* pc = reinterpret_cast<int32_t*>(scratch + w.kp() * w.P * kTile);
  for (int64_t t = t0; t < t1; ++t) {
    expand_tile(w, t, panel, pc);
    switch (w.P) {  // one instance per plane count: the accumulators are registers
      case 1: tile_rows<1>(w, t, panel, pc, xu, xz, sx, xs, M, y); break;
      case 2: tile_rows<2>(w, t, panel, pc, xu, xz, sx, xs, M, y); break;
      case 3: tile_rows<3>(w, t, panel, pc, xu, xz, sx, xs, M, y); break;
      default: tile_rows<4>(w, t, panel, pc, xu, xz, sx, xs, M, y); break;
    }
  }
}

}  // namespace cpu
}  // namespace dbquant
