// Torch-free CUDA decode GEMV for the dual-binary weight format:
//   y[M, N] = x[M, K] @ W^T (+ bias)   for small M (decode: one token per sequence).
//
// W in the canonical packed format v1 (docs/FORMAT.md, dbquant/format/layout.py), unchanged:
//   qweight  uint8    [2, N, Kp/8]  plane 0 = b1, plane 1 = b2; bit j (LSB = 0) of byte i
//                                   of a row is input channel 8*i + j
//   scales   float16  [N, G, 2]     alpha1, alpha2 per group of g input channels
//   offset   float16  [N, G]        beta per group, or nullptr
//   W[n, k] = alpha1[n, k/g] * b1[n, k] + alpha2[n, k/g] * b2[n, k] (+ beta[n, k/g])
// with Kp = ceil(K / g) * g, G = Kp / g, g a multiple of 8 (a byte never spans two groups).
//
// This header is plain C++ (no CUDA or torch types beyond cudaStream_t/cudaError_t), so
// the torch binding (binding_cuda.cpp, host compiler) includes it and dbgemv.cu compiles
// alone with `nvcc -arch=sm_80 -c` on a machine without torch or a GPU.

#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace dbquant {
namespace cuda {

// Activation / output element type (bias has the same type).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Activation rows one launch handles (each warp keeps one fp32 accumulator per row);
// dbgemv_launch splits larger M into launches of this many rows.
constexpr int kMaxRows = 4;
// Warps per block; each warp computes one output row n.
constexpr int kWarpsPerBlock = 4;
// Dynamic shared memory a launch may use without opting in to more (every GPU since
// sm_50 offers 48 KiB by default).
constexpr size_t kMaxSharedBytes = 48 * 1024;

// Shared memory one block needs to stage the scales (and offsets) of its rows.
inline size_t dbgemv_smem_bytes(int64_t G, bool has_offset) {
  return static_cast<size_t>(kWarpsPerBlock) * static_cast<size_t>(G) * (has_offset ? 6 : 4);
}

// Launch y = x @ W^T (+ bias) on `stream`. Pointers are device pointers.
//   x:       [M, K] of `dtype`, row stride ldx elements (ldx >= K), unit column stride.
//   qweight: uint8 [2, N, Kp/8] contiguous.
//   scales:  float16 [N, G, 2] contiguous (passed as raw 16-bit storage).
//   offset:  float16 [N, G] contiguous, or nullptr.
//   bias:    [N] of `dtype`, or nullptr.
//   y:       [M, N] of `dtype`, contiguous.
// Returns cudaErrorInvalidValue on inconsistent sizes or when the staged scales exceed
// kMaxSharedBytes (G > 3072 without offset, > 2048 with), else the launch status.
cudaError_t dbgemv_launch(DType dtype, const void* x, int64_t ldx, int64_t M, int64_t K,
                          const uint8_t* qweight, const void* scales, const void* offset,
                          const void* bias, void* y, int64_t N, int64_t group_size,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace dbquant
