// Plain C++; `omp simd` lets the compiler vectorise the sum of squares (built with
// -fopenmp). See decode_ops.h.

#include "decode_ops.h"

#include <cmath>

namespace dbquant {
namespace cpu {

void rms_norm_rows(const float* x, const float* w, float eps, int64_t D, float* y, int64_t r0,
                   int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)  // vectorise the sum (reassociates it; fine for a norm)
    for (int64_t i = 0; i < D; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / float(D) + eps);
    for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * inv * w[i];
  }
}

}  // namespace cpu
}  // namespace dbquant
