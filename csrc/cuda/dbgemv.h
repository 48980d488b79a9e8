// Torch-free CUDA decode GEMV for the k-plane binary weight format (k = 1..4; 2 = dual binary):
//   y[M, N] = x[M, K] @ W^T (+ bias)   for small M (decode: one token per sequence).
//
// W in the canonical packed format v2 (docs/FORMAT.md, dbquant/format/layout.py), unchanged:
//   qweight  uint8    [k, N, Kp/8]  plane p = b_{p+1}; bit j (LSB = 0) of byte i of a row is
//                                   input channel 8*i + j
//   scales   float16  [N, G, k]     alpha_1..alpha_k per group of g input channels
//   offset   float16  [N, G]        beta per group, or nullptr
//   W[n, k] = sum_p alpha_{p+1}[n, k/g] * b_{p+1}[n, k] (+ beta[n, k/g])
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
// Bit planes k the kernel takes (dbquant/format/layout.py: MAX_PLANES).
constexpr int kMaxPlanes = 4;

// Shared memory one block needs to stage the scales (and offsets) of its rows (k planes).
inline size_t dbgemv_smem_bytes(int64_t G, bool has_offset, int64_t planes = 2) {
  return static_cast<size_t>(kWarpsPerBlock) * static_cast<size_t>(G) *
         static_cast<size_t>(2 * planes + (has_offset ? 2 : 0));
}

// Launch y = x @ W^T (+ bias) on `stream`. Pointers are device pointers.
//   x:       [M, K] of `dtype`, row stride ldx elements (ldx >= K), unit column stride.
//   qweight: uint8 [planes, N, Kp/8] contiguous, planes in 1..kMaxPlanes.
//   scales:  float16 [N, G, planes] contiguous (passed as raw 16-bit storage).
//   offset:  float16 [N, G] contiguous, or nullptr.
//   bias:    [N] of `dtype`, or nullptr.
//   y:       [M, N] of `dtype`, contiguous.
// Returns cudaErrorInvalidValue on inconsistent sizes or when the staged scales exceed
// kMaxSharedBytes (at k = 2: G > 3072 without offset, > 2048 with), else the launch status.
cudaError_t dbgemv_launch(DType dtype, const void* x, int64_t ldx, int64_t M, int64_t K,
                          const uint8_t* qweight, const void* scales, const void* offset,
                          const void* bias, void* y, int64_t N, int64_t group_size,
                          int64_t planes, cudaStream_t stream);

}  // namespace cuda
}  // namespace dbquant
