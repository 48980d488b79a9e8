// Portable scalar path of the t16 lookup-table kernel (see dbgemm_t16.h). It is the
// fallback on CPUs without AVX2 and the readable statement of the exact float
// operations every SIMD path reproduces lane by lane.

#include <cmath>
#include <cstring>

#include "dbgemm_t16.h"

namespace dbquant {
namespace cpu {

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  const uint32_t man = h & 0x3ff;
  float f;
  if (exp == 0) {
    // Zero or subnormal: man * 2^-24 is exact in float32.
    f = std::ldexp(float(man), -24);
    if (sign) f = -f;
    return f;
  }
  uint32_t bits;
  if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);  // rebias 15 -> 127
  }
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

void group_sums(const T16Weight& w, const float* lut_row, float* gsum_row) {
  const int64_t qpg = w.group_size / 4;  // chunks per group
  for (int64_t g = 0; g < w.groups(); ++g) {
    float s = 0.0f;
    for (int64_t q = g * qpg; q < (g + 1) * qpg; ++q) s += lut_row[16 * q + 15];
    gsum_row[g] = s;
  }
}

void build_luts_scalar(const T16Weight& w, const float* x, float* lut, float* gsum, int64_t m0,
                       int64_t m1) {
  const int64_t K = w.K, q_count = w.kp() / 4, lf = lut_floats(w);
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * K;
    float* lr = lut + m * lf;
    for (int64_t q = 0; q < q_count; ++q) {
      float xs[4];
      for (int j = 0; j < 4; ++j) xs[j] = 4 * q + j < K ? xr[4 * q + j] : 0.0f;
      float* t = lr + 16 * q;
      for (int i = 0; i < 16; ++i) {
        float v = 0.0f;
        for (int j = 0; j < 4; ++j)
          if (i >> j & 1) v += xs[j];
        t[i] = v;
      }
    }
    if (gsum) group_sums(w, lr, gsum + m * w.groups());
  }
}

void gemm_tiles_scalar(const T16Weight& w, const float* lut, const float* gsum, int64_t M,
                       float* y, int64_t t0, int64_t t1) {
  const int64_t G = w.groups(), cpg = w.group_size / 8, lf = lut_floats(w), P = w.P;
  UnitPlanes units(w);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tp = units.tile(t);
    const uint16_t* ts = w.scales + t * G * P * kTile;
    const uint16_t* to = w.offset ? w.offset + t * G * kTile : nullptr;
    const int64_t n0 = t * kTile;
    const int rows = int(w.N - n0 < kTile ? w.N - n0 : kTile);
    for (int64_t m = 0; m < M; ++m) {
      const float* L = lut + m * lf;
      float acc_y[kTile] = {};
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t p = 0; p < P; ++p) {  // one table pass per plane
          float lo_p[kTile] = {}, hi_p[kTile] = {};
          for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
            const uint8_t* b = tp + (c * P + p) * kTile;
            const float* lo = L + 16 * (2 * c);
            const float* hi = L + 16 * (2 * c + 1);
            for (int r = 0; r < kTile; ++r) {
              lo_p[r] += lo[b[r] & 15];
              hi_p[r] += hi[b[r] >> 4];
            }
          }
          const uint16_t* a = ts + (g * P + p) * kTile;
          for (int r = 0; r < kTile; ++r) acc_y[r] = std::fma(half_to_float(a[r]), lo_p[r] + hi_p[r], acc_y[r]);
        }
        if (to) {
          const float s = gsum[m * G + g];
          for (int r = 0; r < kTile; ++r) acc_y[r] = std::fma(half_to_float(to[g * kTile + r]), s, acc_y[r]);
        }
      }
      float* yr = y + m * w.N + n0;
      for (int r = 0; r < rows; ++r) yr[r] = w.bias ? acc_y[r] + w.bias[n0 + r] : acc_y[r];
    }
  }
}

void dequantize_tiles(const T16Weight& w, float* out, int64_t t0, int64_t t1) {
  const int64_t G = w.groups(), cpg = w.group_size / 8, P = w.P;
  UnitPlanes units(w);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tp = units.tile(t);
    const uint16_t* ts = w.scales + t * G * P * kTile;
    const uint16_t* to = w.offset ? w.offset + t * G * kTile : nullptr;
    for (int r = 0; r < kTile && t * kTile + r < w.N; ++r) {
      float* row = out + (t * kTile + r) * w.K;
      for (int64_t g = 0; g < G; ++g) {
        // The 2^P levels of this row and group, indexed by b_1 | b_2 << 1 | b_3 << 2 | ...
        float a[kMaxPlanes];
        for (int64_t p = 0; p < P; ++p) a[p] = half_to_float(ts[(g * P + p) * kTile + r]);
        const float beta = to ? half_to_float(to[g * kTile + r]) : 0.0f;
        float level[1 << kMaxPlanes];
        for (int code = 0; code < (1 << P); ++code) {
          float v = 0.0f;
          for (int64_t p = 0; p < P; ++p)
            if (code >> p & 1) v += a[p];
          level[code] = v + beta;
        }
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
          unsigned bytes[kMaxPlanes];
          for (int64_t p = 0; p < P; ++p) bytes[p] = tp[(c * P + p) * kTile + r];
          for (int j = 0; j < 8 && 8 * c + j < w.K; ++j) {
            unsigned code = 0;
            for (int64_t p = 0; p < P; ++p) code |= (bytes[p] >> j & 1) << p;
            row[8 * c + j] = level[code];
          }
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace dbquant
