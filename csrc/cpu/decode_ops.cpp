// Run-time dispatch of the decode-step ops (decode_ops.h) to the AVX-512, AVX2 or portable copy of
// decode_ops_impl.h.

#include "decode_ops.h"

#include "flush_denormals.h"

namespace dbquant {
namespace cpu {

#define DO_DECLARE(NS)                                                                                       \
  namespace NS {                                                                                             \
  void rms_norm_rows(const float*, const float*, float, int64_t, float*, int64_t, int64_t);                  \
  void rope_rows(float*, const float*, const float*, int64_t, int64_t);                                      \
  void attend_one_token(const float*, const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, \
                        float, float, float*, float*, int64_t, int64_t);                                     \
  void attend_one_token(const float*, const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t, int64_t,  \
                        int64_t, float, float, float*, float*, int64_t, int64_t);                            \
  void silu_mul(const float*, int64_t, float*);                                                              \
  void gelu_tanh_mul(const float*, int64_t, float*);                                                         \
  void add_scaled(float*, const float*, float, int64_t);                                                     \
  int64_t argmax_row(const float*, int64_t);                                                                 \
  }
DO_DECLARE(do_scalar)
DO_DECLARE(do_avx2)
DO_DECLARE(do_avx512)
#undef DO_DECLARE

#define DO_DISPATCH(FN, ...)                             \
  switch (isa) {                                         \
    case Isa::Avx512: return do_avx512::FN(__VA_ARGS__); \
    case Isa::Avx2: return do_avx2::FN(__VA_ARGS__);     \
    default: return do_scalar::FN(__VA_ARGS__);          \
  }

void rms_norm_rows(Isa isa, const float* x, const float* w, float eps, int64_t D, float* y, int64_t r0, int64_t r1) {
  DO_DISPATCH(rms_norm_rows, x, w, eps, D, y, r0, r1)
}

void rope_rows(Isa isa, float* x, const float* cos, const float* sin, int64_t heads, int64_t D) {
  DO_DISPATCH(rope_rows, x, cos, sin, heads, D)
}

void attend_one_token(Isa isa, const float* q, const float* k, const float* v, int64_t Hq, int64_t Hk, int64_t L,
                      int64_t D, int64_t n, float scale, float softcap, float* scores, float* out, int64_t h0,
                      int64_t h1) {
  DO_DISPATCH(attend_one_token, q, k, v, Hq, Hk, L, D, n, scale, softcap, scores, out, h0, h1)
}

void attend_one_token(Isa isa, const float* q, const uint16_t* k, const uint16_t* v, int64_t Hq, int64_t Hk,
                      int64_t L, int64_t D, int64_t n, float scale, float softcap, float* scores, float* out,
                      int64_t h0, int64_t h1) {
  DO_DISPATCH(attend_one_token, q, k, v, Hq, Hk, L, D, n, scale, softcap, scores, out, h0, h1)
}

// The gated activations under FlushDenormals: their vectorised fast_exp makes subnormals (flush_denormals.h).
void silu_mul(Isa isa, const float* gu, int64_t I, float* y) {
  const FlushDenormals ftz;
  DO_DISPATCH(silu_mul, gu, I, y)
}

void gelu_tanh_mul(Isa isa, const float* gu, int64_t I, float* y) {
  const FlushDenormals ftz;
  DO_DISPATCH(gelu_tanh_mul, gu, I, y)
}

void add_scaled(Isa isa, float* x, const float* y, float s, int64_t n) { DO_DISPATCH(add_scaled, x, y, s, n) }

int64_t argmax_row(Isa isa, const float* x, int64_t n) { DO_DISPATCH(argmax_row, x, n) }

#undef DO_DISPATCH

}  // namespace cpu
}  // namespace dbquant
