// Portable scalar path of the integer lookup-table kernel (dbgemm_i8lut.h): the readable
// statement of the integer sums and float operations the SIMD paths reproduce lane by lane.

#include <cmath>

#include "dbgemm_i8lut.h"

namespace dbquant {
namespace cpu {

// Entry i of the unit at offset u of the low- (h = 0) or high-nibble (h = 1) tables: the int8 code,
// or the int16 code rebuilt from its top and rem parts (16 top + rem: the scalar build's I16Split::TopRem).
inline int32_t entry(const I8LutRow& row, int h, int64_t u, int i) {
  const int8_t* top = h ? row.hi : row.lo;
  if (!row.lo2) return top[u + i];
  const int8_t* rem = h ? row.hi2 : row.lo2;
  return 16 * int32_t(top[u + i]) + int32_t(rem[u + i]);
}

void gemm_tiles_i8_scalar(const T16Weight& w, const uint8_t* buf, int64_t M, float* y, int64_t t0, int64_t t1,
                          LutKind kind) {
  const int64_t G = w.groups(), cpg = w.group_size / 8, P = w.P;
  UnitPlanes units(w);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tp = units.tile(t);
    const uint16_t* ts = w.scales + t * G * P * kTile;
    const uint16_t* to = w.offset ? w.offset + t * G * kTile : nullptr;
    const int64_t n0 = t * kTile;
    const int rows = int(w.N - n0 < kTile ? w.N - n0 : kTile);
    for (int64_t m = 0; m < M; ++m) {
      const I8LutRow row = i8lut_row(w, const_cast<uint8_t*>(buf), m, kind);
      float acc[kTile] = {};
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t p = 0; p < P; ++p) {
          int32_t S[kTile] = {};  // exact: the SIMD paths' int16 segments widen before they could overflow
          for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
            const int64_t u = (c * P + p) * kTile;
            for (int r = 0; r < kTile; ++r) S[r] += entry(row, 0, u, tp[u + r] & 15) + entry(row, 1, u, tp[u + r] >> 4);
          }
          const uint16_t* a = ts + (g * P + p) * kTile;
          const float h = 0.5f * row.gsum[g];  // what the centred tables leave out (dbgemm_i8lut.h)
          for (int r = 0; r < kTile; ++r)
            acc[r] = std::fma(half_to_float(a[r]), std::fma(float(S[r]), row.scale[g], h), acc[r]);
        }
        if (to)
          for (int r = 0; r < kTile; ++r) acc[r] = std::fma(half_to_float(to[g * kTile + r]), row.gsum[g], acc[r]);
      }
      float* yr = y + m * w.N + n0;
      for (int r = 0; r < rows; ++r) yr[r] = w.bias ? acc[r] + w.bias[n0 + r] : acc[r];
    }
  }
}

}  // namespace cpu
}  // namespace dbquant
