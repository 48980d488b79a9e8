// Dense weights from the t16 layout (dbgemm_t16.h) for prefill GEMMs: with many activation rows,
// one BLAS GEMM on the dequantized weight beats the lookup tables (dbquant/backends/cpu.py).
//
// The output is the transposed weight Wt[K, N] (row-major: Wt[k, n] = W[n, k]) so that the
// 16 rows of a tile are 16 adjacent floats: one SIMD vector per input channel, stored whole
// (a tile written row by row would need a 16 x 8 transpose per byte of planes). BLAS takes
// Wt as it is: y = x @ Wt.
//
// Values: W[n, k] = (((b_1 ? alpha_1 : 0) + (b_2 ? alpha_2 : 0)) + ...) + beta, the same float
// operations in the same order as dequantize_tiles (and the reference), so the float32 output is
// bit for bit the transpose of dequantize_tiles'. The bfloat16 output is that float rounded to
// nearest even (torch's float -> bfloat16 for finite values), by integer ops, or by vcvtneps2bf16
// where the CPU has AVX512-BF16 (the same bits on these values: dequant_t16_avx512_impl.h).

#pragma once

#include <cstdint>

#include "dbgemm_t16.h"

namespace dbquant {
namespace cpu {

// Columns [16 t0, 16 t1) (only those < N) of out [K, N] row-major: float32, or bfloat16 bits
// (uint16) when bf16. Tiles are independent: callers run disjoint ranges in parallel.
void dequantize_t(Isa isa, const T16Weight& w, void* out, bool bf16, int64_t t0, int64_t t1);

void dequantize_t_scalar(const T16Weight& w, void* out, bool bf16, int64_t t0, int64_t t1);
void dequantize_t_avx2(const T16Weight& w, void* out, bool bf16, int64_t t0, int64_t t1);
void dequantize_t_avx512(const T16Weight& w, void* out, bool bf16, int64_t t0, int64_t t1);
void dequantize_t_avx512bf16(const T16Weight& w, void* out, bool bf16, int64_t t0, int64_t t1);

// float32 -> bfloat16 bits, rounded to nearest even (finite inputs).
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace cpu
}  // namespace dbquant
