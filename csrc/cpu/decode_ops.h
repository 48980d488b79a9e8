// Torch-free fused CPU op for a decode step (dbquant/decode.py), where a small model's step
// is dominated by per-op framework overhead rather than arithmetic: one call replaces the
// ~8 ops of torch's composite rms_norm (measured 4.5 vs 16 us for a 576-vector).
// (A fused one-token attention was tried and lost to torch's SDPA: 39 vs 31 us.)
#pragma once

#include <cstdint>

namespace dbquant {
namespace cpu {

// y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w, rows r in [r0, r1); x, y float32
// [R, D] row-major (may alias), w float32 [D]. Matches torch's rms_norm to rounding.
void rms_norm_rows(const float* x, const float* w, float eps, int64_t D, float* y, int64_t r0,
                   int64_t r1);

}  // namespace cpu
}  // namespace dbquant
