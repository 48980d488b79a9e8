// Run-time dispatch of the packed-KV attention kernels (kv_attn.h) to the AVX-512, AVX2 or
// portable path, and the decoding tables they share.

#include "kv_attn.h"

#include <cmath>
#include <cstring>

namespace dbquant {
namespace cpu {

#define KV_DECLARE(NS)                                                                                     \
  namespace NS {                                                                                           \
  void scores_packed(const KVPackedView&, const float*, int64_t, int64_t, float, float*, int64_t, int64_t, \
                     int64_t, int64_t);                                                                    \
  void scores_tail_softmax(const KVPackedView&, const float*, int64_t, int64_t, float, float*, int64_t,    \
                           int64_t, int64_t, int64_t, int64_t);                                            \
  void values_packed(const KVPackedView&, const float*, int64_t, int64_t, int64_t, float*, int64_t,        \
                     int64_t, int64_t);                                                                    \
  void values_tail(const KVPackedView&, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*, \
                   int64_t, int64_t);                                                                      \
  void dequantize(const KVPackedView&, int64_t, float*, float*, int64_t, int64_t, int64_t);                 \
  }
KV_DECLARE(kv_scalar)
KV_DECLARE(kv_avx2)
KV_DECLARE(kv_avx512)
#undef KV_DECLARE

namespace {

// e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; exponent 0 is subnormal; S.1111.111 is NaN.
float fp8_e4m3fn(uint8_t b) {
  const int e = (b >> 3) & 15, m = b & 7;
  if (e == 15 && m == 7) return NAN;
  const float mag = e == 0 ? std::ldexp(float(m) / 8.0f, -6) : std::ldexp(1.0f + float(m) / 8.0f, e - 7);
  return (b & 0x80) ? -mag : mag;
}

KVTables build_tables() {
  KVTables t;
  for (int b = 0; b < 256; ++b) {
    t.fp8[b] = fp8_e4m3fn(uint8_t(b));
    for (int r = 0; r < 4; ++r) t.two[b][r] = float((b >> (2 * r)) & 3);
    for (int r = 0; r < 8; ++r) t.one[b][r] = float((b >> r) & 1);
    int v = b;
    for (int r = 0; r < 5; ++r, v /= 3) t.three[b][r] = t.three8[b][r] = float(v % 3) - 1.0f;
    for (int r = 5; r < 8; ++r) t.three8[b][r] = 0.0f;
  }
  return t;
}

}  // namespace

const KVTables& kv_tables() {
  static const KVTables tables = build_tables();
  return tables;
}

#define KV_DISPATCH(FN, ...)                                   \
  switch (isa) {                                               \
    case Isa::Avx512: return kv_avx512::FN(__VA_ARGS__);       \
    case Isa::Avx2: return kv_avx2::FN(__VA_ARGS__);           \
    default: return kv_scalar::FN(__VA_ARGS__);                \
  }

void kv_scores_packed(Isa isa, const KVPackedView& kv, const float* q, int64_t T, int64_t Hq, float scale,
                      float* scores, int64_t ld, int64_t kh, int64_t g0, int64_t g1) {
  KV_DISPATCH(scores_packed, kv, q, T, Hq, scale, scores, ld, kh, g0, g1)
}

void kv_scores_tail_softmax(Isa isa, const KVPackedView& kv, const float* q, int64_t T, int64_t Hq, float scale,
                            float* scores, int64_t ld, int64_t n_groups, int64_t n_tail, int64_t h0, int64_t h1) {
  KV_DISPATCH(scores_tail_softmax, kv, q, T, Hq, scale, scores, ld, n_groups, n_tail, h0, h1)
}

void kv_values_packed(Isa isa, const KVPackedView& kv, const float* p, int64_t T, int64_t Hq, int64_t ld,
                      float* out, int64_t kh, int64_t g0, int64_t g1) {
  KV_DISPATCH(values_packed, kv, p, T, Hq, ld, out, kh, g0, g1)
}

void kv_values_tail(Isa isa, const KVPackedView& kv, const float* p, int64_t T, int64_t Hq, int64_t ld,
                    int64_t n_groups, int64_t n_tail, float* out, int64_t h0, int64_t h1) {
  KV_DISPATCH(values_tail, kv, p, T, Hq, ld, n_groups, n_tail, out, h0, h1)
}

void kv_dequantize(Isa isa, const KVPackedView& kv, int64_t n_groups, float* keys, float* values, int64_t kh,
                   int64_t g0, int64_t g1) {
  KV_DISPATCH(dequantize, kv, n_groups, keys, values, kh, g0, g1)
}

}  // namespace cpu
}  // namespace dbquant
