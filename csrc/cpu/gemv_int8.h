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
// W8A8 variant (what llama.cpp does for Q8_0 weights): the activations are quantized too,
// per block of kQ8Block channels (K must be a multiple of it):
//   xq int8 [M, K] and xs float32 [M, K / kQ8Block] from quantize_act_q8;
//   y[m, n] = s[n] * sum over blocks b of xs[m, b] * (exact int32 dot of the block's codes).
//   A block holding a NaN or Inf gets xs = NaN (codes 0): the outputs it feeds are NaN
//   (linear_w8a8_ref in dbquant/backends/reference.py defines the same).
// Integer dot products (4 bytes per lane per instruction) make it ~2x faster than the
// float-activation path; the cost is the activations' rounding (docs/RESULTS.md).
constexpr int64_t kQ8Block = 32;
void quantize_act_q8(const float* x, int64_t M, int64_t K, int8_t* xq, float* xs);
void gemv_w8a8_rows_scalar(const int8_t* xq, const float* xs, const int8_t* wq, const float* s, int64_t M,
                           int64_t N, int64_t K, float* y, int64_t n0, int64_t n1);
void gemv_w8a8_rows_avx2(const int8_t* xq, const float* xs, const int8_t* wq, const float* s, int64_t M,
                         int64_t N, int64_t K, float* y, int64_t n0, int64_t n1);
void gemv_int8_rows_avx512(const float* x, const int8_t* wq, const float* s, int64_t M, int64_t N,
                           int64_t K, float* y, int64_t n0, int64_t n1);

}  // namespace cpu
}  // namespace dbquant
