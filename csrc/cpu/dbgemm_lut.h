// Torch-free CPU kernel for the dual-binary GEMM  y[M, N] = x[M, K] @ W^T (+ bias).
//
// W is given in the canonical packed format v1 (docs/FORMAT.md, dbquant/formats.py):
//   qweight  uint8   [2, N, Kp/8]  bit planes b1 (plane 0), b2 (plane 1); bit j (LSB = 0)
//                                  of byte i of a row is input channel 8*i + j
//   scales   float32 [N, G, 2]     alpha1, alpha2 per group of g input channels
//   offset   float32 [N, G]        beta per group, or nullptr
//   bias     float32 [N]           or nullptr
// with Kp = ceil(K / g) * g, G = Kp / g, and
//   W[n, k] = alpha1[n, k/g] * b1[n, k] + alpha2[n, k/g] * b2[n, k] (+ beta[n, k/g]).
//
// Algorithm (T-MAC style lookup tables). Because the planes hold {0, 1}, the dot
// product of one packed byte with 8 activations is one of only 256 partial sums of
// those activations. Per activation row we tabulate, for every 8-channel chunk c,
//   lut[c][byte] = sum_{j : bit j of byte set} x[8c + j],
// and the dot product of a group becomes one table load per byte and plane:
//   y[m, n] += alpha1 * sum_c lut[c][q0[n, c]] + alpha2 * sum_c lut[c][q1[n, c]]
//              (+ beta * sum_{k in group} x[k]).
// The table costs 256 adds per 8 channels per activation row, paid once and shared
// by all N output rows, so it is cheap whenever N >> 32 (every real linear layer).
//
// Usage (what the torch binding does; any caller may do the same):
//   1. lut = buffer of M * lut_floats(K) floats;
//      build_luts(x, K, lut, m0, m1, c0, c1) fills tables (any split of rows/chunks
//      across threads; tables are independent).
//   2. if offset: gsum = buffer of M * G floats; group_sums(lut, K, g, gsum, m0, m1).
//   3. dbgemm_lut_rows(..., n0, n1) for disjoint output-row ranges, in parallel.
// dbgemm_lut() does all three single-threaded (tests, reference use).
//
// Plain C++17, scalar and portable; vectorised variants with runtime dispatch come later.

#pragma once

#include <cstddef>
#include <cstdint>

namespace dbquant {
namespace cpu {

// Number of 8-channel chunks that hold at least one real (k < K) channel: ceil(K / 8).
// Chunks beyond these (the padding up to Kp) are never read: their activations are 0.
inline int64_t num_chunks(int64_t K) { return (K + 7) / 8; }

// Floats of lookup table per activation row: 256 per chunk.
inline int64_t lut_floats(int64_t K) { return num_chunks(K) * 256; }

// Fill the tables of chunks [c0, c1) of activation rows [m0, m1).
//   x:   float32 [M, K] row-major (row stride K), unpadded.
//   lut: float32 [M, num_chunks(K), 256] (row stride lut_floats(K)).
// Channels k >= K in the last chunk count as 0, so padding bits (0 by the format,
// but anything if a file was written carelessly) never contribute.
void build_luts(const float* x, int64_t K, float* lut, int64_t m0, int64_t m1, int64_t c0,
                int64_t c1);

// Per-group activation sums, needed only when an offset is present (beta multiplies
// the group's activation sum). Read off the tables: lut[c][255] is the sum of the
// chunk's 8 activations. Rows [m0, m1); gsum: float32 [M, G] with G = ceil(K/g).
void group_sums(const float* lut, int64_t K, int64_t group_size, float* gsum, int64_t m0,
                int64_t m1);

// Output rows n in [n0, n1) of y for all M activation rows, from prebuilt tables.
//   qweight: uint8 [2, N, Kp/8]; scales: float32 [N, G, 2]; offset: [N, G] or nullptr;
//   bias: [N] or nullptr; gsum: [M, G] (required iff offset != nullptr);
//   y: float32 [M, N] row-major. Writes y[m, n] for n in [n0, n1) only.
void dbgemm_lut_rows(const float* lut, const float* gsum, int64_t M, const uint8_t* qweight,
                     const float* scales, const float* offset, const float* bias, int64_t N,
                     int64_t K, int64_t group_size, float* y, int64_t n0, int64_t n1);

// Whole op, single-threaded: allocates the tables itself (M * lut_floats(K) floats).
void dbgemm_lut(const float* x, int64_t M, int64_t K, const uint8_t* qweight,
                const float* scales, const float* offset, const float* bias, int64_t N,
                int64_t group_size, float* y);

}  // namespace cpu
}  // namespace dbquant
