// Scalar path of the transposed dequantization (dequant_t16.h), and its run-time dispatch.

#include "dequant_t16.h"

namespace dbquant {
namespace cpu {

void dequantize_t(Isa isa, const T16Weight& w, void* out, bool bf16, int64_t t0, int64_t t1) {
  if (isa == Isa::Avx512 && bf16 && avx512_has(Avx512Ext::Bf16)) return dequantize_t_avx512bf16(w, out, bf16, t0, t1);
  if (isa == Isa::Avx512) return dequantize_t_avx512(w, out, bf16, t0, t1);
  if (isa == Isa::Avx2) return dequantize_t_avx2(w, out, bf16, t0, t1);
  return dequantize_t_scalar(w, out, bf16, t0, t1);
}

void dequantize_t_scalar(const T16Weight& w, void* out, bool bf16, int64_t t0, int64_t t1) {
  const int64_t G = w.groups(), cpg = w.group_size / 8, P = w.P;
  float* of = static_cast<float*>(out);
  uint16_t* ob = static_cast<uint16_t*>(out);
  UnitPlanes units(w);
  for (int64_t t = t0; t < t1; ++t) {
    const auto [tp, ts, to] = units.ptrs(t);
    for (int r = 0; r < kTile && t * kTile + r < w.N; ++r) {
      const int64_t n = t * kTile + r;
      for (int64_t g = 0; g < G; ++g) {
        float a[kMaxPlanes];
        for (int64_t p = 0; p < P; ++p) a[p] = half_to_float(ts[(g * P + p) * kTile + r]);
        const float beta = to ? half_to_float(to[g * kTile + r]) : 0.0f;
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
          for (int j = 0; j < 8 && 8 * c + j < w.K; ++j) {
            float v = 0.0f;
            for (int64_t p = 0; p < P; ++p)
              if (tp[(c * P + p) * kTile + r] >> j & 1) v += a[p];
            v += beta;
            const int64_t i = (8 * c + j) * w.N + n;
            if (bf16)
              ob[i] = float_to_bf16(v);
            else
              of[i] = v;
          }
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace dbquant
