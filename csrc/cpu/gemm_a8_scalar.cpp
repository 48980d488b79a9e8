// Scalar path of the 8-bit-activation prefill GEMM (gemm_a8.h) and of the activations' codes, and the
// run-time dispatch of both.

#include <algorithm>
#include <cmath>
#include <cstring>

#include "gemm_a8.h"

namespace dbquant {
namespace cpu {

void quantize_a8(Isa isa, const T16Weight& w, const float* x, uint8_t* xu, int32_t* xz, float* sx, float* xs,
                 int64_t m0, int64_t m1) {
  if (isa == Isa::Avx512) return quantize_a8_avx512(w, x, xu, xz, sx, xs, m0, m1);
  if (isa == Isa::Avx2) return quantize_a8_avx2(w, x, xu, xz, sx, xs, m0, m1);
  quantize_a8_scalar(w, x, xu, xz, sx, xs, m0, m1);
}

void quantize_a8_scalar(const T16Weight& w, const float* x, uint8_t* xu, int32_t* xz, float* sx, float* xs,
                        int64_t m0, int64_t m1) {
  const int64_t g = w.group_size, G = w.groups(), Kp = w.kp(), K = w.K;
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t j = 0; j < G; ++j) {
      const int64_t k0 = j * g, n = std::min(K, k0 + g) - k0, i = m * G + j;
      const float* xg = x + m * K + k0;
      uint8_t* q = xu + m * Kp + k0;
      A8Stats st;
      st.add(xg, 0, n);
      a8_finish_group(st, n, g, q, xz[i], sx[i], xs[i], [&](A8Scale s) { a8_codes(xg, 0, n, s, q); });
    }
}

int64_t a8_scratch_bytes(const T16Weight& w) {
  return w.kp() * w.P * kTile + 2 * w.P * w.groups() * kTile * int64_t(sizeof(int32_t));
}

void gemm_a8_tiles(Isa isa, const T16Weight& w, const uint8_t* xu, const int32_t* xz, const float* sx,
                   const float* xs, int64_t M, float* y, uint8_t* scratch, int64_t t0, int64_t t1, bool int8_weights) {
  // AVX-512 CPUs without VNNI run the AVX2 kernel (the exact planes) or the scalar loop (8-bit levels)
  if (isa == Isa::Avx512 && avx512_has(Avx512Ext::Vnni))
    return gemm_a8_tiles_avx512vnni(w, xu, xz, sx, xs, M, y, scratch, t0, t1, int8_weights);
  if (isa != Isa::Scalar && !int8_weights) return gemm_a8_tiles_avx2(w, xu, xz, sx, xs, M, y, scratch, t0, t1);
  gemm_a8_tiles_scalar(w, xu, xz, sx, xs, M, y, t0, t1, int8_weights);
}

void gemm_a8_tiles_scalar(const T16Weight& w, const uint8_t* xu, const int32_t* xz, const float* sx,
                          const float* xs, int64_t M, float* y, int64_t t0, int64_t t1, bool int8_weights) {
  const int64_t G = w.groups(), g = w.group_size, P = w.P, Kp = w.kp(), N = w.N;
  UnitPlanes units(w);
  float alpha[kMaxPlanes];
  int8_t level[kMaxPlanes];  // r_p of the 8-bit levels
  for (int64_t t = t0; t < t1; ++t) {
    const auto [tp, ts, to] = units.ptrs(t);
    auto bit = [&](int64_t p, int64_t k, int r) { return tp[((k >> 3) * P + p) * kTile + r] >> (k & 7) & 1; };
    for (int r = 0; r < kTile && t * kTile + r < N; ++r) {
      const int64_t n = t * kTile + r;
      for (int64_t m = 0; m < M; ++m) {
        float acc = 0.0f;
        for (int64_t j = 0; j < G; ++j) {
          for (int64_t p = 0; p < P; ++p) alpha[p] = half_to_float(ts[(j * P + p) * kTile + r]);
          float part = 0.0f;
          if (int8_weights) {
            const float step = w8_levels(alpha, P, level);
            int32_t d = 0;
            for (int64_t k = j * g; k < (j + 1) * g; ++k) {
              int32_t q = 0;
              for (int64_t p = 0; p < P; ++p) q += bit(p, k, r) ? level[p] : 0;
              d += (int32_t(xu[m * Kp + k]) - xz[m * G + j]) * q;
            }
            part = step * float(d);
          } else {
            for (int64_t p = 0; p < P; ++p) {
              int32_t d = 0;
              for (int64_t k = j * g; k < (j + 1) * g; ++k)
                if (bit(p, k, r)) d += int32_t(xu[m * Kp + k]) - xz[m * G + j];
              part = p == 0 ? alpha[p] * float(d) : std::fma(alpha[p], float(d), part);
            }
          }
          acc = std::fma(part, sx[m * G + j], acc);
          if (to) acc = std::fma(half_to_float(to[j * kTile + r]), xs[m * G + j], acc);
        }
        y[m * N + n] = w.bias ? acc + w.bias[n] : acc;
      }
    }
  }
}

}  // namespace cpu
}  // namespace dbquant
