// Portable path of the int8-weight projection (see gemv_int8.h).

#include "gemv_int8.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace dbquant {
namespace cpu {

void gemv_int8_rows_scalar(const float* x, const int8_t* wq, const float* s, int64_t M, int64_t N,
                           int64_t K, float* y, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = wq + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += xr[k] * float(w[k]);
      y[m * N + n] = s[n] * acc;
    }
  }
}

void quantize_act_q8(const float* x, int64_t M, int64_t K, int8_t* xq, float* xs) {
  const int64_t B = K / kQ8Block;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + m * K + b * kQ8Block;
      float mx = 0.0f, probe = 0.0f;
      for (int64_t i = 0; i < kQ8Block; ++i) {
        mx = std::max(mx, std::fabs(xb[i]));  // std::max drops a NaN, hence the probe
        probe += xb[i] * 0.0f;                // NaN iff some x is NaN or +-Inf
      }
      // A non-finite block has no int8 code: its scale becomes NaN (codes 0), so the
      // outputs it feeds are NaN rather than silently finite (see gemv_int8.h).
      const bool finite = probe == 0.0f;
      const float d = finite ? mx / 127.0f : std::numeric_limits<float>::quiet_NaN();
      const float inv = finite && d > 0.0f ? 1.0f / d : 0.0f;
      xs[m * B + b] = d;
      for (int64_t i = 0; i < kQ8Block; ++i) xq[m * K + b * kQ8Block + i] = int8_t(std::nearbyint(xb[i] * inv));
    }
}

void gemv_w8a8_rows_scalar(const int8_t* xq, const float* xs, const int8_t* wq, const float* s, int64_t M,
                           int64_t N, int64_t K, float* y, int64_t n0, int64_t n1) {
  const int64_t B = K / kQ8Block;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.0f;
      for (int64_t b = 0; b < B; ++b) {
        int32_t dot = 0;
        for (int64_t i = b * kQ8Block; i < (b + 1) * kQ8Block; ++i)
          dot += int32_t(xq[m * K + i]) * int32_t(wq[n * K + i]);
        acc += xs[m * B + b] * float(dot);
      }
      y[m * N + n] = s[n] * acc;
    }
}

}  // namespace cpu
}  // namespace dbquant
