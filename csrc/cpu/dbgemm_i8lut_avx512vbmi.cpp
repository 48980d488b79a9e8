// AVX-512 VBMI path of the integer lookup-table kernel: dbgemm_i8lut_avx512_impl.h with vpermb /
// vpermi2b on compact tables. Compiled for AVX-512F/BW/VBMI + F16C + FMA by the pragma below; only
// called after a run-time check (i8lut_vbmi in dbgemm_i8lut.cpp).

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx2,fma,f16c")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define I8_NS i8_avx512vbmi
#define I8_VBMI 1
#define I8_DW 0
#include "dbgemm_i8lut_avx512_impl.h"

namespace dbquant {
namespace cpu {

void build_i8luts_avx512vbmi(const T16Weight& w, const float* x, uint8_t* buf, int64_t m0, int64_t m1, int64_t j0,
                             int64_t j1) {
  i8_avx512vbmi::build_rows<1>(w, x, buf, m0, m1, j0, j1);
}

void gemm_tiles_i8_avx512vbmi(const T16Weight& w, const uint8_t* buf, int64_t M, float* y, int64_t t0, int64_t t1) {
  i8_avx512vbmi::gemm_rows<1>(w, buf, M, y, t0, t1);
}

}  // namespace cpu
}  // namespace dbquant
