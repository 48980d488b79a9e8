// Portable path of the int8-weight projection (see gemv_int8.h).

#include "gemv_int8.h"

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

}  // namespace cpu
}  // namespace dbquant
