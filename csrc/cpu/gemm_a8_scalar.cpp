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
  return w.kp() * w.P * kTile + (2 * w.P + 1) * w.groups() * kTile * int64_t(sizeof(int32_t));
}

bool a8_uses_lanes(Isa isa, bool int8_weights) {
  return int8_weights && isa == Isa::Avx512 && avx512_has(Avx512Ext::Vnni);
}

int64_t a8_lane_bytes(const T16Weight& w, int64_t M) {
  const int64_t B = (M + kTile - 1) / kTile;
  return B * kTile * (w.kp() + 3 * w.groups() * int64_t(sizeof(int32_t)));
}

A8Lanes a8_lanes_at(const T16Weight& w, int64_t M, uint8_t* buf) {
  const int64_t B = (M + kTile - 1) / kTile, n = B * w.groups() * kTile;
  uint8_t* codes = buf;
  int32_t* z = reinterpret_cast<int32_t*>(buf + B * kTile * w.kp());
  float* sx = reinterpret_cast<float*>(z + n);
  return {codes, z, sx, sx + n};
}

void a8_to_lanes(const T16Weight& w, const uint8_t* xu, const int32_t* xz, const float* sx, const float* xs,
                 int64_t M, const A8Lanes& lanes, int64_t b0, int64_t b1) {
  const int64_t Kp = w.kp(), G = w.groups();
  for (int64_t b = b0; b < b1; ++b)
    for (int r = 0; r < kTile; ++r) {
      const int64_t m = b * kTile + r;
      uint8_t* c = lanes.codes + b * Kp * kTile + 4 * r;
      if (m < M)
        for (int64_t s = 0; s < Kp / 4; ++s) std::memcpy(c + s * 4 * kTile, xu + m * Kp + 4 * s, 4);
      else
        for (int64_t s = 0; s < Kp / 4; ++s) std::memset(c + s * 4 * kTile, 0, 4);
      for (int64_t j = 0; j < G; ++j) {
        const int64_t i = (b * G + j) * kTile + r;
        lanes.z[i] = m < M ? xz[m * G + j] : 0;
        lanes.sx[i] = m < M ? sx[m * G + j] : 0.0f;
        lanes.xs[i] = m < M ? xs[m * G + j] : 0.0f;
      }
    }
}

void gemm_a8_tiles(Isa isa, const T16Weight& w, const uint8_t* xu, const int32_t* xz, const float* sx,
                   const float* xs, int64_t M, float* y, uint8_t* scratch, int64_t t0, int64_t t1, bool int8_weights,
                   const A8Lanes* lanes) {
  if (a8_uses_lanes(isa, int8_weights)) return gemm_w8_tiles_avx512vnni(w, *lanes, M, y, scratch, t0, t1);
  // AVX-512 CPUs without VNNI run the AVX2 kernel (the exact planes) or the scalar loop (8-bit levels)
  if (isa == Isa::Avx512 && avx512_has(Avx512Ext::Vnni) && !int8_weights)
    return gemm_a8_tiles_avx512vnni(w, xu, xz, sx, xs, M, y, scratch, t0, t1);
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
