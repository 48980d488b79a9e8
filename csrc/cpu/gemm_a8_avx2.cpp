// AVX2 path of the 8-bit-activation prefill GEMM (gemm_a8.h). Per tile: the planes expanded to a panel of
// bytes {0, 1} and each group's negated popcounts (once), then for each block of up to 2 activation rows,
// per group: int16 sums that start at -z times the popcount (one vpmullw per sum), vpmaddubsw of 4
// broadcast activation codes of a row with each plane's panel bytes of both half tiles (16 output rows)
// added to them, one vpmaddwd to int32 per plane, and the float epilogue in gemm_a8.h's order. The tile's
// panel (2 P Kp bytes) stays in L1 or L2 while every activation row passes over it.
//
// Why 2 rows x 16 outputs and not 4 x 8: each step then loads 2 codes (broadcasts) for 4 P panel
// vectors, which vpmaddubsw reads from memory, and GCC keeps the 4 P accumulators in registers without
// copying them each step; and the zero point enters as the sums' start (int16, one multiply per sum)
// instead of an int32 multiply and subtraction per output in the epilogue. Together 1.2-1.5x the 4 x 8
// kernel, bit for bit the same outputs (docs/RESULTS.md).
// Compiled for AVX2 + FMA + F16C by the pragma; called only after a run-time CPU check.

#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>

#include <algorithm>
#include <cmath>
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

// A tile's planes (tp: unit order) as bytes, panel[((s * 2 + h) * P + p) * 32 + 4 r + i] = bit 4 s + i of row 8 h + r in
// plane p (a step's 2 P vectors contiguous); negpc[(j * P + p) * 16 + r] = the int16 pair (-c0, -c1), c0
// (c1) the popcount of row r's bits of plane p in group j on channels 4 s + 0, 1 (4 s + 2, 3): the two
// int16 halves of a vpmaddubsw lane sum those channels.
void expand_tile(const T16Weight& w, const uint8_t* tp, uint8_t* panel, int32_t* negpc) {
  const int64_t P = w.P, cpg = w.group_size / 8;
  // byte 4 r' + i of a half's vector comes from row 8 h + r' (both lanes hold the 16 rows' bytes)
  const __m256i idx[2] = {_mm256_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3,
                                           4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7),
                          _mm256_setr_epi8(8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11,
                                           12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15)};
  const __m256i bits[2] = {_mm256_set1_epi32(0x08040201), _mm256_set1_epi32(int(0x80402010u))};
  const __m256i one = _mm256_set1_epi8(1);
  const __m128i even = _mm_set1_epi8(0x33);  // channels 4 s + 0, 1 of a byte's 8
  for (int64_t j = 0; j < w.groups(); ++j)
    for (int64_t p = 0; p < P; ++p) {
      __m256i count[2][2] = {};  // [channel pair][rows 0..7, 8..15]
      for (int64_t c = j * cpg; c < (j + 1) * cpg; ++c) {
        const __m128i v16 = _mm_loadu_si128((const __m128i*)(tp + (c * P + p) * kTile));
        for (int e = 0; e < 2; ++e) {
          const __m128i n = popcount_bytes(e == 0 ? _mm_and_si128(v16, even) : _mm_andnot_si128(even, v16));
          count[e][0] = _mm256_add_epi32(count[e][0], _mm256_cvtepu8_epi32(n));
          count[e][1] = _mm256_add_epi32(count[e][1], _mm256_cvtepu8_epi32(_mm_srli_si128(n, 8)));
        }
        const __m256i v = _mm256_broadcastsi128_si256(v16);
        for (int nib = 0; nib < 2; ++nib)
          for (int h = 0; h < 2; ++h) {
            const __m256i b = _mm256_min_epu8(_mm256_and_si256(_mm256_shuffle_epi8(v, idx[h]), bits[nib]), one);
            _mm256_store_si256((__m256i*)(panel + (((2 * c + nib) * 2 + h) * P + p) * 32), b);
          }
      }
      const __m256i low16 = _mm256_set1_epi32(0xFFFF), zero = _mm256_setzero_si256();
      for (int h = 0; h < 2; ++h)  // -c0 in the low int16, -c1 in the high one (each <= g / 2 <= 128)
        _mm256_storeu_si256((__m256i*)(negpc + (j * P + p) * kTile + 8 * h),
                            _mm256_or_si256(_mm256_and_si256(_mm256_sub_epi32(zero, count[0][h]), low16),
                                            _mm256_slli_epi32(_mm256_sub_epi32(zero, count[1][h]), 16)));
    }
}

// Rows [m, m + MR) of half tiles [h0, h0 + H) of tile t: out[mr * ldo + 8 (h - h0) + 0..7] = y before the bias.
template <int MR, int H, int P>
void row_block(const T16Weight& w, int64_t t, int h0, const uint8_t* panel, const int32_t* negpc, const uint8_t* xu,
               const int32_t* xz, const float* sx, const float* xs, int64_t m, float* out, int64_t ldo) {
  const int64_t G = w.groups(), S = w.group_size / 4, Kp = w.kp();
  const auto [tp, ts, to] = tile_ptrs(w, t);
  const __m256i ones16 = _mm256_set1_epi16(1);
  __m256 y[MR][H];
  for (int mr = 0; mr < MR; ++mr)
    for (int h = 0; h < H; ++h) y[mr][h] = _mm256_setzero_ps();
  const uint8_t* x0 = xu + m * Kp;
  for (int64_t j = 0; j < G; ++j) {
    // each int16 sum starts at -z c >= -255 g / 2 >= -32640 and only grows, to the sum of (code - z) over
    // its channels' set bits, <= 255 g / 2: no int16 overflow while g <= kA8MaxGroup
    __m256i acc[MR][H][P];
    for (int mr = 0; mr < MR; ++mr) {
      const __m256i z = _mm256_set1_epi16(int16_t(xz[(m + mr) * G + j]));
      for (int h = 0; h < H; ++h)
        for (int p = 0; p < P; ++p)
          acc[mr][h][p] = _mm256_mullo_epi16(
              _mm256_loadu_si256((const __m256i*)(negpc + (j * P + p) * kTile + 8 * (h0 + h))), z);
    }
    const uint8_t* wp = panel + (j * S * 2 + h0) * P * 32;
    const uint8_t* xp = x0 + j * S * 4;
    for (int64_t s = 0; s < S; ++s, wp += 2 * P * 32, xp += 4) {
      __m256i xb[MR];
      for (int mr = 0; mr < MR; ++mr) {
        int32_t v;
        std::memcpy(&v, xp + mr * Kp, 4);
        xb[mr] = _mm256_set1_epi32(v);
      }
      for (int hp = 0; hp < H * P; ++hp) {
        const __m256i wv = _mm256_load_si256((const __m256i*)(wp + hp * 32));
        for (int mr = 0; mr < MR; ++mr) {
          __m256i& a = acc[mr][hp / P][hp % P];
          a = _mm256_add_epi16(a, _mm256_maddubs_epi16(xb[mr], wv));
          // an empty asm pins the sum to its register: without it GCC copies every accumulator each step
          __asm__("" : "+x"(a));
        }
      }
    }
    for (int h = 0; h < H; ++h) {
      __m256 a[P];
      for (int p = 0; p < P; ++p)
        a[p] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(ts + (j * P + p) * kTile + 8 * (h0 + h))));
      const __m256 beta = to ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(to + j * kTile + 8 * (h0 + h))))
                             : _mm256_setzero_ps();
      for (int mr = 0; mr < MR; ++mr) {
        __m256 part = _mm256_setzero_ps();
        for (int p = 0; p < P; ++p) {
          const __m256 d = _mm256_cvtepi32_ps(_mm256_madd_epi16(acc[mr][h][p], ones16));
          part = p == 0 ? _mm256_mul_ps(a[0], d) : _mm256_fmadd_ps(a[p], d, part);
        }
        y[mr][h] = _mm256_fmadd_ps(part, _mm256_set1_ps(sx[(m + mr) * G + j]), y[mr][h]);
        if (to) y[mr][h] = _mm256_fmadd_ps(beta, _mm256_set1_ps(xs[(m + mr) * G + j]), y[mr][h]);
      }
    }
  }
  for (int mr = 0; mr < MR; ++mr)
    for (int h = 0; h < H; ++h) _mm256_storeu_ps(out + mr * ldo + 8 * h, y[mr][h]);
}

template <int P>
void tile_rows(const T16Weight& w, int64_t t, const uint8_t* panel, const int32_t* negpc, const uint8_t* xu,
               const int32_t* xz, const float* sx, const float* xs, int64_t M, float* y) {
  // 2 rows x both half tiles up to 3 planes (2 * 2 * 3 accumulators, 2 codes, 1 product: 15 of the 16
  // registers), one half tile at a time with 4 planes
  constexpr int H = P <= 3 ? 2 : 1;
  const int64_t N = w.N, n0 = t * kTile;
  const bool whole = n0 + kTile <= N;
  alignas(32) float part[2 * kTile];  // the last, partial tile: its rows < N copied out
  for (int64_t m = 0; m < M; m += 2) {
    const int mr = int(std::min<int64_t>(2, M - m));
    float* out = whole ? y + m * N + n0 : part;
    const int64_t ldo = whole ? N : kTile;
    for (int h0 = 0; h0 < 2; h0 += H) {
      if (mr == 2) row_block<2, H, P>(w, t, h0, panel, negpc, xu, xz, sx, xs, m, out + 8 * h0, ldo);
      else row_block<1, H, P>(w, t, h0, panel, negpc, xu, xz, sx, xs, m, out + 8 * h0, ldo);
    }
    if (!whole)
      for (int i = 0; i < mr; ++i)
        for (int r = 0; n0 + r < N; ++r) y[(m + i) * N + n0 + r] = part[i * kTile + r];
  }
  if (w.bias)
    for (int64_t m = 0; m < M; ++m)
      for (int r = 0; r < kTile && n0 + r < N; ++r) y[m * N + n0 + r] += w.bias[n0 + r];
}

}  // namespace

// quantize_a8 (gemm_a8.h) 8 channels at a time: the same bytes and floats as quantize_a8_scalar (min / max
// and the probe in any order, the sum in its 8 partials, the codes per channel), ~10x faster: the scalar
// loop calls nearbyintf for every channel.
void quantize_a8_avx2(const T16Weight& w, const float* x, uint8_t* xu, int32_t* xz, float* sx, float* xs,
                      int64_t m0, int64_t m1) {
  const int64_t g = w.group_size, G = w.groups(), Kp = w.kp(), K = w.K;
  const __m256i first = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);  // dword 0 of each lane after the packs
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t j = 0; j < G; ++j) {
      const int64_t k0 = j * g, n = std::min(K, k0 + g) - k0, n8 = n & ~int64_t(7), i = m * G + j;
      const float* xg = x + m * K + k0;
      uint8_t* q = xu + m * Kp + k0;
      __m256 vlo = _mm256_setzero_ps(), vhi = vlo, vsum = vlo, vprobe = vlo;
      for (int64_t k = 0; k < n8; k += 8) {
        const __m256 v = _mm256_loadu_ps(xg + k);
        vlo = _mm256_min_ps(vlo, v);
        vhi = _mm256_max_ps(vhi, v);
        vsum = _mm256_add_ps(vsum, v);
        vprobe = _mm256_add_ps(vprobe, _mm256_mul_ps(v, _mm256_setzero_ps()));
      }
      A8Stats st;
      alignas(32) float lo8[8], hi8[8], probe8[8];
      _mm256_store_ps(lo8, vlo);
      _mm256_store_ps(hi8, vhi);
      _mm256_storeu_ps(st.part, vsum);
      _mm256_store_ps(probe8, vprobe);
      for (int l = 0; l < 8; ++l) {
        st.lo = std::min(st.lo, lo8[l]);
        st.hi = std::max(st.hi, hi8[l]);
        st.probe += probe8[l];
      }
      st.add(xg, n8, n);
      a8_finish_group(st, n, g, q, xz[i], sx[i], xs[i], [&](A8Scale s) {
        const __m256 vinv = _mm256_set1_ps(s.inv);
        const __m256i vz = _mm256_set1_epi32(s.z);
        for (int64_t k = 0; k < n8; k += 8) {
          // nearbyint (to nearest even, as the scalar loop's default rounding mode), + z, then the packs
          // saturate to [0, 255]: the scalar clamp
          const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xg + k), vinv),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          const __m256i c = _mm256_add_epi32(_mm256_cvtps_epi32(r), vz);
          const __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(c, c), _mm256_setzero_si256());
          _mm_storel_epi64((__m128i*)(q + k), _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(b, first)));
        }
        a8_codes(xg, n8, n, s, q);
      });
    }
}

void gemm_a8_tiles_avx2(const T16Weight& w, const uint8_t* xu, const int32_t* xz, const float* sx,
                        const float* xs, int64_t M, float* y, uint8_t* scratch, int64_t t0, int64_t t1) {
  uint8_t* panel = scratch;
  int32_t* negpc = reinterpret_cast<int32_t*>(scratch + w.kp() * w.P * kTile);
  UnitPlanes units(w);
  for (int64_t t = t0; t < t1; ++t) {
    expand_tile(w, units.tile(t), panel, negpc);
    switch (w.P) {  // one instance per plane count: the accumulators are registers
      case 1: tile_rows<1>(w, t, panel, negpc, xu, xz, sx, xs, M, y); break;
      case 2: tile_rows<2>(w, t, panel, negpc, xu, xz, sx, xs, M, y); break;
      case 3: tile_rows<3>(w, t, panel, negpc, xu, xz, sx, xs, M, y); break;
      default: tile_rows<4>(w, t, panel, negpc, xu, xz, sx, xs, M, y); break;
    }
  }
}

}  // namespace cpu
}  // namespace dbquant
