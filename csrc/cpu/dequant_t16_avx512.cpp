// AVX-512F/BW/VL path of the transposed dequantization (dequant_t16_avx512_impl.h): bfloat16 by integer
// rounding. Compiled for AVX-512F/BW/VL + F16C by the pragma; called only after a run-time CPU check.

#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define DQ_NS dq_avx512
#define DQ_CVTNE 0
#include "dequant_t16_avx512_impl.h"

namespace dbquant {
namespace cpu {

void dequantize_t_avx512(const T16Weight& w, void* out, bool bf16, int64_t t0, int64_t t1) {
  dq_avx512::dequantize(w, out, bf16, t0, t1);
}

}  // namespace cpu
}  // namespace dbquant
