// Torch-free CPU kernels for attention on a packed VidKV cache (dbquant/runtime/kv/packed.py,
// docs/FORMAT.md "Packed KV cache"): the keys and values of whole token groups are read as
// codes, never dequantized into a float copy of the past. The oracle is kv_attend_ref in
// dbquant/backends/reference.py.
//
// Keys of one group (G tokens, D channels, per kv head): the na "anomalous" channels hold 2-bit
// codes along the tokens (x ~ min + scale * code), the nn = D - na normal channels hold the n
// sign bits of their real rfft coefficients (y ~ scale * (2b - 1)); k_normal = y @ fmat
// (fmat = irfft_real of the identity, or the identity without FFT). So, per group,
//   q . k_t = sum_j q[a_j] min_j + sum_j (q[a_j] scale_j) code_jt          (2-bit: table lookups)
//           + sum_i wq_i s_i (2 b_it - 1),   wq = fmat @ q[normal channels]  (Parseval: q is
// transformed once per group, not each key back), which is why no key is ever decoded.
// Values: ternary codes per channel: out[c] = sum_g scale_gc sum_t p_t trit_gct.
// The first S tokens (the sink, inside group 0) and the full-precision tail take the plain path.
#pragma once

#include <cstdint>

#include "dbgemm_t16.h"  // Isa

namespace dbquant {
namespace cpu {

constexpr int64_t kKvMaxD = 256;  // head_dim and group size bounds of the stack buffers
constexpr int64_t kKvMaxG = 256;

// One layer's packed cache (pointers into caller-owned memory). Slot s = kh * NG + g.
//   kmask  uint8 [Hk, NG, D/8]     channel c anomalous iff bit c (LSB first); used only when 0 < na < D
//   kcodes uint8 [Hk, NG, na, G/4] 2-bit codes, token t in byte t/4 at bits 2(t%4)
//   kmin, kscale uint8 [Hk, NG, na] fp8 e4m3 bits;  nbits uint8 [Hk, NG, nn, G/8] (token t: byte t/8, bit t%8)
//   nscale uint8 [Hk, NG, nn] fp8;  vtrits uint8 [Hk, NG, TB], TB = G ceil(D / 5), token-major: the trit of
//   token t, channel c is base-3 digit c % 5 of byte t ceil(D / 5) + c / 5, stored + 1 (a token's row decodes
//   with ceil(D / 5) table lookups into contiguous channels);  vscale uint8 [Hk, NG, D] fp8
//   factors float32 [Hk, NG, 4]: the block factors of kmin, kscale, nscale, vscale (scale = fp8 * factor)
//   fmat float32 [nn, nn];  sink_k, sink_v float32 [Hk, S, D];  tail_k, tail_v float32 [Hk, TC, D]
//   (channel order within a part: ascending channel index)
struct KVPackedView {
  int64_t Hk, D, G, NG, na, nn, TB, S, TC;
  const uint8_t *kmask, *kcodes, *kmin, *kscale, *nbits, *nscale, *vtrits, *vscale;
  const float *factors, *fmat, *sink_k, *sink_v;
  float *tail_k, *tail_v;
};

// Queries q float32 [T, Hq, D] (rotated, unscaled); scores/p float32 [T, Hq, ld]; out float32 [T, Hq, D].
// Query head h reads kv head h / (Hq / Hk). Positions: the packed tokens 0 .. n_groups G - 1, then the
// tail's; query t sees tail rows j < n_tail - T + t + 1 (the queries are the tail's last T rows).

// scores[t, h, g G + i] = scale * q . k for the groups [g0, g1) of kv head kh (sink rows exact).
void kv_scores_packed(Isa isa, const KVPackedView& kv, const float* q, int64_t T, int64_t Hq, float scale,
                      float* scores, int64_t ld, int64_t kh, int64_t g0, int64_t g1);
// Tail scores, then the softmax of each row over its visible positions, for query heads [h0, h1).
void kv_scores_tail_softmax(Isa isa, const KVPackedView& kv, const float* q, int64_t T, int64_t Hq, float scale,
                            float* scores, int64_t ld, int64_t n_groups, int64_t n_tail, int64_t h0, int64_t h1);
// out[t, h, :] += sum over the tokens of groups [g0, g1) of p * v, for the query heads of kv head kh.
void kv_values_packed(Isa isa, const KVPackedView& kv, const float* p, int64_t T, int64_t Hq, int64_t ld,
                      float* out, int64_t kh, int64_t g0, int64_t g1);
// out[t, h, :] += sum over visible tail rows of p * v, for query heads [h0, h1).
void kv_values_tail(Isa isa, const KVPackedView& kv, const float* p, int64_t T, int64_t Hq, int64_t ld,
                    int64_t n_groups, int64_t n_tail, float* out, int64_t h0, int64_t h1);

// The packed groups [g0, g1) of kv head kh as float32 keys, values [Hk, n_groups G, D] (the sink's
// exact rows in group 0): for chunks of many queries, where one decode per group beats a transform
// of every query per group (prefill).
void kv_dequantize(Isa isa, const KVPackedView& kv, int64_t n_groups, float* keys, float* values, int64_t kh,
                   int64_t g0, int64_t g1);

// Decoding tables shared by every path (built once, at load).
struct KVTables {
  float fp8[256];       // e4m3fn bits -> value (NaN codes -> NaN)
  float two[256][4];    // a byte of four 2-bit codes -> the codes as floats
  float one[256][8];    // a byte of eight bits -> the bits as 0.0 / 1.0
  float three[256][5];  // a byte of five base-3 digits -> the trits -1, 0, 1 (bytes > 242 unused)
  float three8[256][8]; // the same padded to 8 floats with zeros (one 8-wide load per byte)
};
const KVTables& kv_tables();

}  // namespace cpu
}  // namespace dbquant
