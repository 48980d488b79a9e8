// Prefill GEMM on 8-bit activations ("a8"): y[M, N] = x[M, K] @ W^T (+ bias) for many rows, where
// the dual-binary weight stays exact (its bit planes are read as they are: no dequantization) and only
// the activations are rounded, to 8 bits per row and weight group with a zero point. On a CPU without
// fast bf16 GEMMs this replaces "dequantize to float32 + BLAS" (dequant_t16.h): no float weight is
// written, and integer multiply-adds do 32 products per instruction (docs/RESULTS.md has the measured
// ratios and the perplexity cost).
//
// Activations (quantize_a8), per row m and group j (the g channels [g j, g j + g) of Kp; padded
// channels k >= K are 0), asymmetric with 0 exact (a zero point, as the padded channels need):
//   lo = min(0, min_k x), hi = max(0, max_k x), inv = hi - lo >= 2^-120 ? 255 / (hi - lo) : 0 (a smaller
//        range rounds to codes z: 255 / (hi - lo) would overflow)
//   xz  int32   [M, G]   z = nearbyint(-lo * inv), in [0, 255] (the code of 0)
//   xu  uint8   [M, Kp]  clamp(nearbyint(x * inv) + z, 0, 255) (the unsigned operand of vpmaddubsw)
//   sx  float32 [M, G]   (hi - lo) / 255 (the step: x ~ sx (xu - z))
//   xs  float32 [M, G]   the group's x summed as 8 partial sums from +0 (partial i: channels k0 + i,
//                        k0 + i + 8, ... in order), then ((p0 + p4) + (p2 + p6)) + ((p1 + p5) + (p3 + p7)):
//                        an 8-lane vector's order, on every path (what an offset multiplies)
//   A group holding a NaN or an Inf gets sx = xs = NaN and codes 0 (z = 0): every output it feeds is
//   NaN, as x @ W^T's would be.
//
// Integer part, exact: D[m, j, p, n] = sum over the group's channels of (xu[m, k] - z[m, j]) * b_p[n, k]
// (int32; the AVX2 kernel sums each half of the group's channels in an int16 lane that starts at -z
// times the half's popcount and adds g / 4 steps of two products <= 255: within +-255 g / 2 while
// g <= kA8MaxGroup).
// Float part, in this order on every path, per output (m, n), groups j in order, y starting at 0:
//   t = alpha_1[j, n] * D_1;  t = fma(alpha_2[j, n], D_2, t); ...;  y = fma(t, sx[m, j], y)
//   with an offset:  y = fma(beta[j, n], xs[m, j], y);        at the end:  y = y + bias[n]
// so the scalar and AVX2 paths agree bit for bit (tests), and gemm_a8_ref
// (dbquant/backends/reference.py) computes the same integers. Against x @ W^T the error is the
// activations' rounding, |x - sx (xu - z)| <= sx / 2 per channel, hence per output
//   |y - x @ W^T| <= sum_j sx[m, j] / 2 * sum_{k in j} |W[n, k] - beta[j, n]|  (+ float32 rounding)
// (the offset multiplies the exact xs, so it adds no rounding of x).
//
// 8-bit weight levels ("w8a8", int8_weights): the same activations, and the planes of each output row n and
// group j merged into one int8 weight per channel, so that one integer dot replaces P of them (on AVX-512
// VNNI one vpdpbusd per 4 channels instead of P: 64 products per instruction instead of 64 / P):
//   ok  = every alpha_p[j, n] finite
//   L   = max(sum_p (alpha_p > 0 ? alpha_p : 0), sum_p (alpha_p < 0 ? -alpha_p : 0))   (float32, p in order)
//   s   = ok ? L / (127 - P / 2) : NaN                                          (the group's step, float32)
//   r_p = ok && s > 0 ? nearbyint(alpha_p / s) : 0                              (int8)
//   q[n, k] = sum_p r_p b_p[n, k]
// L is the largest |sum of a subset of the alphas|, and rounding moves each r_p by <= 1/2, so every q (a
// subset's sum) is within +-127. The weight becomes beta + s q: each alpha_p moves by <= s / 2 = L / 252 at
// P = 2 (where alpha_1 and alpha_2 have opposite signs, as they nearly always do after calibration, L is
// the larger |alpha| alone). The integer part is D'[m, j, n] = sum_k (xu[m, k] - z[m, j]) q[n, k] (int32:
// |D'| <= 255 * 127 * g), and the float part is the exact one's with P = 1 and alpha = s:
//   t = s[j, n] * D';  y = fma(t, sx[m, j], y);  then the offset and the bias as above
// (a group with a non-finite alpha gives t = NaN * 0 = NaN, as x @ W^T would). gemm_a8_ref(...,
// int8_weights=True) is the torch definition; docs/RESULTS.md has the measured perplexity cost.
//
// The AVX-512 VNNI kernel (gemm_a8_avx512vnni.cpp, the AVX-512 path where the CPU has VNNI) does the same
// with int32 sums: per 4 channels one vpdpbusd of the broadcast codes with each plane's 16 rows x 4 bytes;
// with 8-bit weight levels the same loops run on one plane, the tile's levels (P = 1, alpha = s).
// The AVX2 kernel expands one tile's planes to bytes {0, 1} (a "panel", uint8 [Kp/4, 2, P, 8, 4]: per
// 4 channels, per half tile, per plane, 8 output rows of 4 bytes), then for 2 activation rows at a time
// broadcasts 4 codes of a row into all lanes and multiplies them with each plane's bytes of both half
// tiles by vpmaddubsw, adding the int16 pairs over the group; one vpmaddwd per group and plane widens them.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "dbgemm_t16.h"

namespace dbquant {
namespace cpu {

// Largest group the int16 sums hold: g / 2 channels' (code - z) * bit each, 255 g / 2 <= 32767.
constexpr int64_t kA8MaxGroup = 256;

// Rows [m0, m1) of x float32 [M, K] (row stride K) into xu [M, Kp], xz, sx, xs [M, G] (above); every
// path gives the same bytes and floats.
void quantize_a8(Isa isa, const T16Weight& w, const float* x, uint8_t* xu, int32_t* xz, float* sx, float* xs,
                 int64_t m0, int64_t m1);
void quantize_a8_scalar(const T16Weight& w, const float* x, uint8_t* xu, int32_t* xz, float* sx, float* xs,
                        int64_t m0, int64_t m1);
void quantize_a8_avx2(const T16Weight& w, const float* x, uint8_t* xu, int32_t* xz, float* sx, float* xs,
                      int64_t m0, int64_t m1);
void quantize_a8_avx512(const T16Weight& w, const float* x, uint8_t* xu, int32_t* xz, float* sx, float* xs,
                        int64_t m0, int64_t m1);

// The pieces of quantize_a8 every path shares. Each ISA's translation unit includes this header after
// its `#pragma GCC target`: the anonymous namespace gives each its own copy compiled for its ISA (one
// inline symbol shared across them could resolve to the AVX2 build's copy on a CPU without AVX2).
namespace {

// What a group's codes follow from its range [lo, hi] (lo <= 0 <= hi), the same on every path.
struct A8Scale {
  float inv;  // x * inv + z is the code before rounding
  int32_t z;  // the code of 0
};
inline A8Scale a8_scale(float lo, float hi) {
  const float inv = hi - lo >= 0x1p-120f ? 255.0f / (hi - lo) : 0.0f;
  return {inv, int32_t(std::nearbyint(-lo * inv))};
}

// A group's running statistics in quantize_a8: its range, the 8 partial sums of xs (above) and a probe
// that is NaN exactly when the group holds a NaN or an Inf.
struct A8Stats {
  float lo = 0.0f, hi = 0.0f, part[8] = {}, probe = 0.0f;
  // Channels [kb, n) of the group at xg, one by one: all of them on the scalar path, the tail past the
  // last full vector on a SIMD one.
  void add(const float* xg, int64_t kb, int64_t n) {
    for (int64_t k = kb; k < n; ++k) {
      lo = std::min(lo, xg[k]);
      hi = std::max(hi, xg[k]);
      part[k & 7] += xg[k];
      probe += xg[k] * 0.0f;
    }
  }
};

// Codes of channels [kb, n) of the group at xg, one by one.
inline void a8_codes(const float* xg, int64_t kb, int64_t n, A8Scale s, uint8_t* q) {
  for (int64_t k = kb; k < n; ++k) q[k] = uint8_t(std::clamp(int(std::nearbyint(xg[k] * s.inv)) + s.z, 0, 255));
}

// The rest of one group of n <= g channels once its statistics are in, the same on every path: a group
// holding a NaN or an Inf gets codes 0 and NaN; otherwise codes(scale) writes the codes of its n
// channels into q, and this the padded channels' (z), xz, sx and xs.
template <class Codes>
void a8_finish_group(const A8Stats& st, int64_t n, int64_t g, uint8_t* q, int32_t& xz, float& sx, float& xs,
                     Codes&& codes) {
  if (st.probe != 0.0f) {
    std::memset(q, 0, size_t(g));
    xz = 0;
    sx = xs = NAN;
    return;
  }
  const A8Scale scale = a8_scale(st.lo, st.hi);
  codes(scale);
  std::memset(q + n, scale.z, size_t(g - n));  // padded channels: x = 0
  xz = scale.z;
  sx = (st.hi - st.lo) / 255.0f;
  xs = ((st.part[0] + st.part[4]) + (st.part[2] + st.part[6])) + ((st.part[1] + st.part[5]) + (st.part[3] + st.part[7]));
}

// One output row's 8-bit levels in group j (above): alpha float32 [P] in, r int8 [P] out; returns s.
inline float w8_levels(const float* alpha, int64_t P, int8_t* r) {
  P = std::min<int64_t>(P, kMaxPlanes);  // callers' arrays hold kMaxPlanes (T16Weight checks P)
  bool ok = true;
  float pos = 0.0f, neg = 0.0f;
  for (int64_t p = 0; p < P; ++p) {
    ok = ok && std::isfinite(alpha[p]);
    pos += alpha[p] > 0.0f ? alpha[p] : 0.0f;
    neg += alpha[p] < 0.0f ? -alpha[p] : 0.0f;
  }
  const float s = ok ? std::max(pos, neg) / (127.0f - 0.5f * float(P)) : NAN;
  for (int64_t p = 0; p < P; ++p) r[p] = ok && s > 0.0f ? int8_t(std::nearbyint(alpha[p] / s)) : 0;
  return s;
}

}  // namespace

// Bytes of scratch gemm_a8_tiles needs per call (one tile's panel, its popcounts or level sums, and its
// scales or steps as floats).
int64_t a8_scratch_bytes(const T16Weight& w);

// y[m, n] (float32 [M, N] row-major) for all M rows and the output rows of tiles [t0, t1), with
// the bias added; int8_weights: the 8-bit weight levels (above) instead of the exact planes.
// scratch: a8_scratch_bytes(w) bytes, 32-byte aligned, this call's own.
// Tiles are independent: callers run disjoint ranges in parallel. Requires w.group_size <= kA8MaxGroup.
// With int8_weights, CPUs without AVX-512 VNNI run the scalar loop (no AVX2 kernel: vpmaddubsw's int16
// pairs would saturate on 8-bit weights).
void gemm_a8_tiles(Isa isa, const T16Weight& w, const uint8_t* xu, const int32_t* xz, const float* sx,
                   const float* xs, int64_t M, float* y, uint8_t* scratch, int64_t t0, int64_t t1,
                   bool int8_weights = false);

void gemm_a8_tiles_scalar(const T16Weight& w, const uint8_t* xu, const int32_t* xz, const float* sx,
                          const float* xs, int64_t M, float* y, int64_t t0, int64_t t1, bool int8_weights);
void gemm_a8_tiles_avx2(const T16Weight& w, const uint8_t* xu, const int32_t* xz, const float* sx,
                        const float* xs, int64_t M, float* y, uint8_t* scratch, int64_t t0, int64_t t1);
void gemm_a8_tiles_avx512vnni(const T16Weight& w, const uint8_t* xu, const int32_t* xz, const float* sx,
                              const float* xs, int64_t M, float* y, uint8_t* scratch, int64_t t0, int64_t t1,
                              bool int8_weights);

}  // namespace cpu
}  // namespace dbquant
