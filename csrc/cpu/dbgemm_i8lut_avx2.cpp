// AVX2 path of the integer lookup-table kernel (dbgemm_i8lut.h for tables, order and bound): the
// AVX-512 path's scheme (dbgemm_i8lut_avx512.cpp) with 2 units per ymm (vpshufb looks up within
// each 128-bit lane, which is exactly one unit's 16-byte table). Unit i of a segment belongs to
// plane i % P, so with P = 3 or 4 the plane of a lane depends on the ymm's phase v mod P / 2.
// int16 tables are split TopRem here (dbgemm_i8lut.h, "int16 tables": measured faster on this path).
// Compiled for AVX2 + FMA + F16C by the pragma below; only called after a run-time check.

#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>

#include <algorithm>

#include "dbgemm_i8lut.h"
#include "dbgemm_i8lut_unit.h"
#include "prefetch.h"

namespace dbquant {
namespace cpu {

namespace {

constexpr int gcd_c(int a, int b) { return b ? gcd_c(b, a % b) : a; }

// One segment (byte columns [c0, c1) of one group: n = (c1 - c0) P units) of one tile and
// activation row: S[p][h] (int32, rows 8h..8h+7) = plane p's sums of the codes. Its own function so
// that the wide loop holds only its accumulators, the masks and the loaded bytes: with the group's
// sums and y live across the loop (the form before) GCC spilled lookups and rebuilt its constants
// every iteration, about half the kernel's time on an AMD Zen 3 (docs/RESULTS.md).
template <int P, int E>
inline void segment(const uint8_t* wb, const int8_t* tl, const int8_t* th, const int8_t* rl, const int8_t* rh,
                    int64_t n, __m256i (&S)[P][2]) {
  constexpr int W = 2, NPH = P / gcd_c(W, P);
  const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi8(1);
  __m256i acc[NPH][2], rem[NPH];  // int16 sums (int16 tables: of the top parts); uint8 rem sums
  for (int v = 0; v < NPH; ++v) acc[v][0] = acc[v][1] = rem[v] = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + W * NPH <= n; i += W * NPH) {
    for (int v = 0; v < NPH; ++v) {
      const int64_t o = (i + W * v) * kTile;
      const __m256i b = _mm256_loadu_si256((const __m256i*)(wb + o));
      prefetch_ahead(wb + o);
      const __m256i il = _mm256_and_si256(b, m4), ih = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4);
      const __m256i vl = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)(tl + o)), il);
      const __m256i vh = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)(th + o)), ih);
      acc[v][0] = _mm256_add_epi16(acc[v][0], _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(vl, vh)));
      acc[v][1] = _mm256_add_epi16(acc[v][1], _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(vl, vh)));
      if constexpr (E == 2) {  // the rem parts add in uint8 lanes (at most 240 per segment)
        const __m256i ul = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)(rl + o)), il);
        const __m256i uh = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)(rh + o)), ih);
        rem[v] = _mm256_add_epi8(rem[v], _mm256_add_epi8(ul, uh));
      }
    }
  }
  if constexpr (E == 2)  // the codes' sums: 16 top + rem
    for (int v = 0; v < NPH; ++v) {
      const __m256i z = _mm256_setzero_si256();
      acc[v][0] = _mm256_add_epi16(_mm256_slli_epi16(acc[v][0], 4), _mm256_unpacklo_epi8(rem[v], z));
      acc[v][1] = _mm256_add_epi16(_mm256_slli_epi16(acc[v][1], 4), _mm256_unpackhi_epi8(rem[v], z));
    }
  __m128i ps[P][2];
  for (int p = 0; p < P; ++p) ps[p][0] = ps[p][1] = _mm_setzero_si128();
  for (; i < n; ++i)
    unit_xmm<E, I16Split::TopRem>(wb + i * kTile, tl + i * kTile, th + i * kTile, E == 2 ? rl + i * kTile : nullptr,
                                  E == 2 ? rh + i * kTile : nullptr, ps[i % P][0], ps[i % P][1]);
  for (int v = 0; v < NPH; ++v)
    for (int h = 0; h < 2; ++h) {
      const __m128i L[W] = {_mm256_castsi256_si128(acc[v][h]), _mm256_extracti128_si256(acc[v][h], 1)};
      for (int j = 0; j < W; ++j) ps[(W * v + j) % P][h] = _mm_add_epi16(ps[(W * v + j) % P][h], L[j]);
    }
  for (int p = 0; p < P; ++p)
    for (int h = 0; h < 2; ++h) S[p][h] = _mm256_cvtepi16_epi32(ps[p][h]);
}

// y (rows 0..7 in y0, 8..15 in y1) of one tile and activation row; E bytes per table entry.
template <int P, int E>
inline void tile_row(const T16Weight& w, const I8LutRow& row, const uint8_t* tp, const uint16_t* ts,
                     const uint16_t* to, __m256& y0, __m256& y1) {
  constexpr int64_t SEG = lut_segment_cols(lut_kind_for(E));
  const int64_t G = w.groups(), cpg = w.group_size / 8;
  y0 = y1 = _mm256_setzero_ps();
  auto seg = [&](int64_t c0, __m256i (&S)[P][2]) {  // the group's segment from byte column c0
    const int64_t c1 = std::min((c0 / cpg + 1) * cpg, c0 + SEG), off0 = c0 * P * kTile;
    segment<P, E>(tp + off0, row.lo + off0, row.hi + off0, E == 2 ? row.lo2 + off0 : nullptr,
                  E == 2 ? row.hi2 + off0 : nullptr, (c1 - c0) * P, S);
  };
  for (int64_t g = 0; g < G; ++g) {
    __m256i S[P][2];  // plane p's exact sums over the group, rows 8h..8h+7
    seg(g * cpg, S);
    for (int64_t c0 = g * cpg + SEG; c0 < (g + 1) * cpg; c0 += SEG) {  // groups of more than SEG columns
      __m256i T[P][2];
      seg(c0, T);
      for (int p = 0; p < P; ++p)
        for (int h = 0; h < 2; ++h) S[p][h] = _mm256_add_epi32(S[p][h], T[p][h]);
    }
    const __m256 s = _mm256_set1_ps(row.scale[g]), h = _mm256_set1_ps(0.5f * row.gsum[g]);  // the centring's term
    for (int p = 0; p < P; ++p) {
      const uint16_t* a = ts + (g * P + p) * kTile;
      y0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)a)),
                           _mm256_fmadd_ps(_mm256_cvtepi32_ps(S[p][0]), s, h), y0);
      y1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(a + 8))),
                           _mm256_fmadd_ps(_mm256_cvtepi32_ps(S[p][1]), s, h), y1);
    }
    if (to) {
      const __m256 gs = _mm256_set1_ps(row.gsum[g]);
      y0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(to + g * kTile))), gs, y0);
      y1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(to + g * kTile + 8))), gs, y1);
    }
  }
}

template <int P, int E>
void tiles(const T16Weight& w, const uint8_t* buf, int64_t M, float* y, int64_t t0, int64_t t1) {
  constexpr LutKind kind = lut_kind_for(E);
  const int64_t G = w.groups();
  I8LutRow views[kI8RowViews];
  i8lut_rows(w, buf, M, kind, views);
  UnitPlanes units(w);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tp = units.tile(t);
    const uint16_t* ts = w.scales + t * G * P * kTile;
    const uint16_t* to = w.offset ? w.offset + t * G * kTile : nullptr;
    const int64_t n0 = t * kTile;
    const int rows = int(std::min<int64_t>(kTile, w.N - n0));
    for (int64_t m = 0; m < M; ++m) {
      __m256 y0, y1;
      tile_row<P, E>(w, m < kI8RowViews ? views[m] : i8lut_row(w, const_cast<uint8_t*>(buf), m, kind), tp, ts, to, y0, y1);
      alignas(32) float out[kTile];
      _mm256_store_ps(out, y0);
      _mm256_store_ps(out + 8, y1);
      float* yr = y + m * w.N + n0;
      for (int r = 0; r < rows; ++r) yr[r] = w.bias ? out[r] + w.bias[n0 + r] : out[r];
    }
  }
}

// Entries 0..7 (lo) and 8..15 (hi) of chunk q's centred partial sums C_q (dbgemm_i8lut.h), in the
// scalar build's order: lane i adds x[4q + j] when bit j of i is set (adding +0 elsewhere leaves a
// sum unchanged), then the centre h_q is subtracted.
inline void chunk_table(const float* xr, int64_t K, int64_t q, __m256& lo, __m256& hi) {
  float v[4];
  for (int j = 0; j < 4; ++j) v[j] = 4 * q + j < K ? xr[4 * q + j] : 0.0f;
  const __m256 z = _mm256_setzero_ps(), h = _mm256_set1_ps(chunk_centre(xr, K, q));
  lo = _mm256_add_ps(z, _mm256_blend_ps(z, _mm256_set1_ps(v[0]), 0xAA));
  lo = _mm256_add_ps(lo, _mm256_blend_ps(z, _mm256_set1_ps(v[1]), 0xCC));
  lo = _mm256_add_ps(lo, _mm256_blend_ps(z, _mm256_set1_ps(v[2]), 0xF0));
  hi = _mm256_sub_ps(_mm256_add_ps(lo, _mm256_set1_ps(v[3])), h);
  lo = _mm256_sub_ps(lo, h);
}

// The 16 codes round_half_even(lo * inv), round_half_even(hi * inv) (|.| <= code_max by
// construction) as bytes: for int8 tables the codes themselves in `top`; for int16 tables (split:
// this path's I16Split::TopRem) their top parts (code >> 4) in `top` and rem parts (code & 15) in `rem`.
inline void quantize16(__m256 lo, __m256 hi, __m256 inv, bool split, __m128i& top, __m128i& rem) {
  const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(lo, inv)), b = _mm256_cvtps_epi32(_mm256_mul_ps(hi, inv));
  const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), _MM_SHUFFLE(3, 1, 2, 0));
  const __m256i t = split ? _mm256_srai_epi16(w16, 4) : w16, r = _mm256_and_si256(w16, _mm256_set1_epi16(15));
  top = _mm_packs_epi16(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
  rem = _mm_packus_epi16(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

}  // namespace

void build_i8luts_avx2(const T16Weight& w, const float* x, uint8_t* buf, int64_t m0, int64_t m1, LutKind kind,
                       int64_t j0, int64_t j1) {
  const int64_t K = w.K, g = w.group_size, P = w.P;
  const float top = float(lut_code_max(kind));
  const bool split = kind == LutKind::Int16;  // this path's I16Split::TopRem
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const int64_t nq = g / 4;
  const bool keep = nq <= kBuildChunks;
  alignas(32) float kept[kBuildChunks * 16];  // the group's centred tables, pass 1 to pass 2
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * K;
    const I8LutRow row = i8lut_row(w, buf, m, kind);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t q0 = j * nq;
      __m256 vmax = _mm256_setzero_ps(), lo, hi;
      for (int64_t i = 0; i < nq; ++i) {
        chunk_table(xr, K, q0 + i, lo, hi);
        if (keep) {
          _mm256_store_ps(kept + 16 * i, lo);
          _mm256_store_ps(kept + 16 * i + 8, hi);
        }
        vmax = _mm256_max_ps(vmax, _mm256_max_ps(_mm256_and_ps(lo, absmask), _mm256_and_ps(hi, absmask)));
      }
      alignas(32) float mv[8];
      _mm256_store_ps(mv, vmax);
      float mx = 0.0f;
      for (float v : mv) mx = std::max(mx, v);
      const float inv = mx > 0.0f ? top / mx : 0.0f;
      row.scale[j] = mx / top;
      row.gsum[j] = group_sum(xr, K, j, g);
      const __m256 vinv = _mm256_set1_ps(inv);
      auto table = [&](int64_t i) {  // chunk q0 + i's centred table into (lo, hi)
        if (keep) {
          lo = _mm256_load_ps(kept + 16 * i);
          hi = _mm256_load_ps(kept + 16 * i + 8);
        } else {
          chunk_table(xr, K, q0 + i, lo, hi);
        }
      };
      for (int64_t c = j * g / 8; c < (j + 1) * g / 8; ++c) {
        __m128i tl, th, rl, rh;
        table(2 * c - q0);
        quantize16(lo, hi, vinv, split, tl, rl);
        table(2 * c + 1 - q0);
        quantize16(lo, hi, vinv, split, th, rh);
        for (int64_t p = 0; p < P; ++p) {
          _mm_storeu_si128((__m128i*)(row.lo + (c * P + p) * kTile), tl);
          _mm_storeu_si128((__m128i*)(row.hi + (c * P + p) * kTile), th);
          if (split) {
            _mm_storeu_si128((__m128i*)(row.lo2 + (c * P + p) * kTile), rl);
            _mm_storeu_si128((__m128i*)(row.hi2 + (c * P + p) * kTile), rh);
          }
        }
      }
    }
  }
}

namespace {
template <int E>
void gemm_rows(const T16Weight& w, const uint8_t* buf, int64_t M, float* y, int64_t t0, int64_t t1) {
  switch (w.P) {
    case 1: return tiles<1, E>(w, buf, M, y, t0, t1);
    case 2: return tiles<2, E>(w, buf, M, y, t0, t1);
    case 3: return tiles<3, E>(w, buf, M, y, t0, t1);
    default: return tiles<4, E>(w, buf, M, y, t0, t1);
  }
}
}  // namespace

void gemm_tiles_i8_avx2(const T16Weight& w, const uint8_t* buf, int64_t M, float* y, int64_t t0, int64_t t1,
                        LutKind kind) {
  if (kind == LutKind::Int16) return gemm_rows<2>(w, buf, M, y, t0, t1);
  gemm_rows<1>(w, buf, M, y, t0, t1);
}

}  // namespace cpu
}  // namespace dbquant
