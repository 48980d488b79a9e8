// Torch-free CPU kernel for a dense int8-weight projection  y[M, N] = x[M, K] @ (s * Wq)^T,
// used for a model's dense output projection (the largest weight of a small model, e.g.
// SmolLM2's 49152 x 576 lm_head: 113 MB in float32, 28 MB in int8).
//   x   float32 [M, K] row-major
//   wq  int8    [N, K] row-major, per-row symmetric codes in [-127, 127]
//   s   float32 [N]    per-row scale
//   y   float32 [M, N]
// Each output is s[n] * sum_k x[m, k] * wq[n, k], accumulated in float32 (activations are
// not quantized). Rows [n0, n1) only, so callers can split N across threads.
#pragma once

#include <cstdint>

namespace dbquant {
namespace cpu {

void gemv_int8_rows_scalar(const float* x, const int8_t* wq, const float* s, int64_t M, int64_t N,
                           int64_t K, float* y, int64_t n0, int64_t n1);
void gemv_int8_rows_avx2(const float* x, const int8_t* wq, const float* s, int64_t M, int64_t N,
                         int64_t K, float* y, int64_t n0, int64_t n1);
void gemv_int8_rows_avx512(const float* x, const int8_t* wq, const float* s, int64_t M, int64_t N,
                           int64_t K, float* y, int64_t n0, int64_t n1);

}  // namespace cpu
}  // namespace dbquant
