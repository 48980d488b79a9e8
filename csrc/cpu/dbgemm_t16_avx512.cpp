// AVX-512 path of the t16 lookup-table kernel (see dbgemm_t16.h for layout and math).
// Compiled for AVX-512F/BW + F16C + FMA by the pragma below, whatever the build flags;
// only called after a run-time CPU check, so the package still runs on older CPUs.

#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
// GCC 12's own intrinsic headers trip -Wmaybe-uninitialized (their `__Y = __Y` idiom).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include <algorithm>

#include "dbgemm_t16.h"
#include "prefetch.h"
#include "t16_unit_avx512.h"

namespace dbquant {
namespace cpu {

namespace {

// Activation rows handled together: each tile's weight bytes are turned into index
// vectors once and reused for MB rows. 5 accumulators per row + 4 index vectors +
// 2 tables stay inside the 32 zmm registers for MB <= 5.
constexpr int kRowsPerPass = 4;

// One table pass over group g for planes p0 .. p0 + NP - 1 (NP = 1 or 2), then
// acc_y = fma(alpha_p, lo_p + hi_p, acc_y) in plane order. NP = 2 is the dual-binary pass:
// the two planes' four sums are independent, so the adds are not one latency chain. COLS: the
// planes' byte order (dbgemm_t16.h), read in place.
template <int MB, int NP, int COLS>
inline void plane_pass(const T16Weight& w, const float* const* L, const uint8_t* tp, const uint16_t* ts,
                       int64_t g, int64_t p0, __m512* acc_y) {
  const int64_t P = w.P, cpg = w.group_size / 8;
  __m512 lo[NP][MB], hi[NP][MB];
  for (int q = 0; q < NP; ++q)
    for (int i = 0; i < MB; ++i) lo[q][i] = hi[q][i] = _mm512_setzero_ps();
  prefetch_ahead(ts + (g * P + p0) * kTile);
  for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
    prefetch_ahead(tp + (c * P + p0) * kTile);
    // 16 bytes (one per row) of each plane -> 16 int32 lanes; vpermps reads only the
    // low 4 bits of each lane, so neither nibble needs masking.
    __m512i b[NP], bh[NP];
    for (int q = 0; q < NP; ++q) {
      b[q] = unit_lanes<COLS>(tp, P, c, p0 + q);
      bh[q] = _mm512_srli_epi32(b[q], 4);
    }
    for (int i = 0; i < MB; ++i) {
      const __m512 tlo = _mm512_loadu_ps(L[i] + 16 * (2 * c));
      const __m512 thi = _mm512_loadu_ps(L[i] + 16 * (2 * c + 1));
      for (int q = 0; q < NP; ++q) {
        lo[q][i] = _mm512_add_ps(lo[q][i], _mm512_permutexvar_ps(b[q], tlo));
        hi[q][i] = _mm512_add_ps(hi[q][i], _mm512_permutexvar_ps(bh[q], thi));
      }
    }
  }
  for (int q = 0; q < NP; ++q) {
    const __m512 a = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(ts + (g * P + p0 + q) * kTile)));
    for (int i = 0; i < MB; ++i) acc_y[i] = _mm512_fmadd_ps(a, _mm512_add_ps(lo[q][i], hi[q][i]), acc_y[i]);
  }
}

template <int MB, int COLS>
inline void tile_rows(const T16Weight& w, const float* lut, const float* gsum, int64_t m0,
                      float* y, int64_t t, const uint8_t* tp) {
  const int64_t G = w.groups(), lf = lut_floats(w), P = w.P;
  const uint16_t* ts = w.scales + t * G * P * kTile;
  const uint16_t* to = w.offset ? w.offset + t * G * kTile : nullptr;
  const float* L[MB];
  for (int i = 0; i < MB; ++i) L[i] = lut + (m0 + i) * lf;

  __m512 acc_y[MB];
  for (int i = 0; i < MB; ++i) acc_y[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    int64_t p = 0;
    for (; p + 2 <= P; p += 2) plane_pass<MB, 2, COLS>(w, L, tp, ts, g, p, acc_y);
    if (p < P) plane_pass<MB, 1, COLS>(w, L, tp, ts, g, p, acc_y);
    if (to) {
      const __m512 beta = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(to + g * kTile)));
      for (int i = 0; i < MB; ++i)
        acc_y[i] = _mm512_fmadd_ps(beta, _mm512_set1_ps(gsum[(m0 + i) * G + g]), acc_y[i]);
    }
  }
  const int64_t n0 = t * kTile;
  const int rows = int(std::min<int64_t>(kTile, w.N - n0));
  const __mmask16 keep = rows == kTile ? __mmask16(0xffff) : __mmask16((1u << rows) - 1);
  for (int i = 0; i < MB; ++i) {
    __m512 v = acc_y[i];
    if (w.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(keep, w.bias + n0));
    _mm512_mask_storeu_ps(y + (m0 + i) * w.N + n0, keep, v);
  }
}

}  // namespace

void build_luts_avx512(const T16Weight& w, const float* x, float* lut, float* gsum, int64_t m0,
                       int64_t m1) {
  const int64_t K = w.K, q_count = w.kp() / 4, lf = lut_floats(w);
  // Lane i of the table adds x[j] when bit j of i is set.
  const __mmask16 bit[4] = {0xAAAA, 0xCCCC, 0xF0F0, 0xFF00};
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * K;
    float* lr = lut + m * lf;
    for (int64_t q = 0; q < q_count; ++q) {
      __m512 t = _mm512_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        const float v = 4 * q + j < K ? xr[4 * q + j] : 0.0f;
        t = _mm512_mask_add_ps(t, bit[j], t, _mm512_set1_ps(v));
      }
      _mm512_storeu_ps(lr + 16 * q, t);
    }
    if (gsum) group_sums(w, lr, gsum + m * w.groups());
  }
}

namespace {

template <int COLS>
void tiles(const T16Weight& w, const float* lut, const float* gsum, int64_t M, float* y, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tp = w.planes + t * tile_plane_bytes(w);  // either order, read in place
    int64_t m = 0;
    for (; m + kRowsPerPass <= M; m += kRowsPerPass) tile_rows<kRowsPerPass, COLS>(w, lut, gsum, m, y, t, tp);
    switch (M - m) {
      case 3: tile_rows<3, COLS>(w, lut, gsum, m, y, t, tp); break;
      case 2: tile_rows<2, COLS>(w, lut, gsum, m, y, t, tp); break;
      case 1: tile_rows<1, COLS>(w, lut, gsum, m, y, t, tp); break;
      default: break;
    }
  }
}

}  // namespace

void gemm_tiles_avx512(const T16Weight& w, const float* lut, const float* gsum, int64_t M,
                       float* y, int64_t t0, int64_t t1) {
  if (w.cols == 4) return tiles<4>(w, lut, gsum, M, y, t0, t1);
  tiles<1>(w, lut, gsum, M, y, t0, t1);
}

}  // namespace cpu
}  // namespace dbquant
