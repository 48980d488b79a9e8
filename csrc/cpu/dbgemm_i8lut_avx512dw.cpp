// Dword-row path of the integer lookup-table kernel (dbgemm_i8lut_avx512_impl.h, "Dword rows"): weights
// in the t16 layout's dword-row order (dbgemm_t16.h, cols 4), tables looked up by vpermb and summed by
// vpdpbusd. Compiled for AVX-512F/BW/VL + VBMI + VNNI + F16C + FMA by the pragma below; only called
// after a run-time check (dword_rows_supported, in dbgemm_i8lut.cpp's dispatch).

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,avx2,fma,f16c")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define I8_NS i8_avx512dw
#define I8_VBMI 0
#define I8_DW 1
#include "dbgemm_i8lut_avx512_impl.h"

namespace dbquant {
namespace cpu {

void build_i8luts_avx512dw(const T16Weight& w, const float* x, uint8_t* buf, int64_t m0, int64_t m1, LutKind kind,
                           int64_t j0, int64_t j1) {
  if (kind == LutKind::Int16) return i8_avx512dw::build_rows<2>(w, x, buf, m0, m1, j0, j1);
  i8_avx512dw::build_rows<1>(w, x, buf, m0, m1, j0, j1);
}

void gemm_tiles_i8_avx512dw(const T16Weight& w, const uint8_t* buf, int64_t M, float* y, int64_t t0, int64_t t1,
                            LutKind kind) {
  if (kind == LutKind::Int16) return i8_avx512dw::gemm_rows<2>(w, buf, M, y, t0, t1);
  i8_avx512dw::gemm_rows<1>(w, buf, M, y, t0, t1);
}

}  // namespace cpu
}  // namespace dbquant
