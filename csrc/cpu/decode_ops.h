// Torch-free fused CPU ops for a decode step (dbquant/runtime/decode.py), where a small model's step
// is dominated by per-op framework overhead rather than arithmetic. rms_norm_rows replaces
// the ~8 ops of torch's composite rms_norm (measured 4.5 vs 16 us for a 576-vector); the
// others are the pieces of one whole decoder layer for one token (binding.cpp's
// decode_layer_cpu), which replaces ~20 torch ops per layer with one call.
// Each takes the ISA path to run (decode_ops.cpp dispatches to decode_ops_{scalar,avx2,avx512}.cpp,
// one source, decode_ops_impl.h, compiled three times); the paths differ only in how the compiler
// vectorised the loops, i.e. in float summation order.
#pragma once

#include <cstdint>

#include "dbgemm_t16.h"  // Isa

namespace dbquant {
namespace cpu {

// y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w, rows r in [r0, r1); x, y float32
// [R, D] row-major (may alias), w float32 [D]. Matches torch's rms_norm to rounding.
void rms_norm_rows(Isa isa, const float* x, const float* w, float eps, int64_t D, float* y, int64_t r0,
                   int64_t r1);

// Rotary embedding of `heads` rows of x float32 [heads, D] (in place) at one position, in
// the rotate-half convention of Llama-family models (HF apply_rotary_pos_emb):
// x = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[D/2:], x[:D/2]); cos, sin float32 [D].
void rope_rows(Isa isa, float* x, const float* cos, const float* sin, int64_t heads, int64_t D);

// Attention of one query token, query heads [h0, h1). q float32 [Hq, D] (rotated); the
// caches k, v float32 [Hk, L, D] hold the n attended positions from their first row (head
// stride L*D: a sliding window passes pointers offset to its first position); query head h
// reads kv head h / (Hq / Hk) (grouped-query attention). scores float32 [Hq, n] scratch;
// out float32 [Hq, D] = softmax(s) v per head, s = q k^T * scale, or softcap * tanh(s / softcap)
// when softcap > 0 (Gemma-2's attention logit soft-capping).
void attend_one_token(Isa isa, const float* q, const float* k, const float* v, int64_t Hq, int64_t Hk,
                      int64_t L, int64_t D, int64_t n, float scale, float softcap, float* scores,
                      float* out, int64_t h0, int64_t h1);
// The same over float16 caches: k, v hold IEEE float16 bits [Hk, L, D], widened exactly to float32
// as they are read (vcvtph2ps; the portable path converts in software); everything else as above.
void attend_one_token(Isa isa, const float* q, const uint16_t* k, const uint16_t* v, int64_t Hq, int64_t Hk,
                      int64_t L, int64_t D, int64_t n, float scale, float softcap, float* scores,
                      float* out, int64_t h0, int64_t h1);

// y[i] = silu(gu[i]) * gu[I + i] for i < I (a gate/up pair side by side: gu float32 [2I]).
void silu_mul(Isa isa, const float* gu, int64_t I, float* y);

// y[i] = gelu_tanh(gu[i]) * gu[I + i] for i < I (Gemma's gelu_pytorch_tanh gated MLP), with
// gelu_tanh(g) = g / 2 * (1 + tanh(sqrt(2 / pi) * (g + 0.044715 g^3))).
void gelu_tanh_mul(Isa isa, const float* gu, int64_t I, float* y);

// x[i] += y[i] * s for i < n (a branch joining the residual stream).
void add_scaled(Isa isa, float* x, const float* y, float s, int64_t n);

// torch.argmax(x[0..n)) for n >= 1: the index of the first maximum, or of the first NaN if any
// (greedy decoding's pick from the logits).
int64_t argmax_row(Isa isa, const float* x, int64_t n);

}  // namespace cpu
}  // namespace dbquant
