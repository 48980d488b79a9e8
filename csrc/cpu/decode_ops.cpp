// Plain C++; `omp simd` lets the compiler vectorise the reductions (built with -fopenmp).
// See decode_ops.h.

#include "decode_ops.h"

#include "fast_exp.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace dbquant {
namespace cpu {

namespace {

// tanh(x) = 1 - 2 / (exp(2x) + 1), through fast_exp (exact limits +-1 where it clamps).
inline float fast_tanh(float x) { return 1.0f - 2.0f / (fast_exp(2.0f * x) + 1.0f); }

}  // namespace

void rms_norm_rows(const float* x, const float* w, float eps, int64_t D, float* y, int64_t r0,
                   int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)  // vectorise the sum (reassociates it; fine for a norm)
    for (int64_t i = 0; i < D; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / float(D) + eps);
    for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * inv * w[i];
  }
}

void rope_rows(float* x, const float* cos, const float* sin, int64_t heads, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* xr = x + h * D;
    for (int64_t i = 0; i < half; ++i) {
      const float a = xr[i], b = xr[i + half];
      xr[i] = a * cos[i] - b * sin[i];
      xr[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

void attend_one_token(const float* q, const float* k, const float* v, int64_t Hq, int64_t Hk,
                      int64_t L, int64_t D, int64_t n, float scale, float softcap, float* scores,
                      float* out, int64_t h0, int64_t h1) {
  const int64_t group = Hq / Hk;
  for (int64_t h = h0; h < h1; ++h) {
    const float* qh = q + h * D;
    const float* kh = k + (h / group) * L * D;
    const float* vh = v + (h / group) * L * D;
    float* s = scores + h * n;
    float mx = -INFINITY;
    for (int64_t t = 0; t < n; ++t) {
      const float* kt = kh + t * D;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < D; ++i) dot += qh[i] * kt[i];
      s[t] = dot * scale;
      if (softcap > 0.0f) s[t] = softcap * fast_tanh(s[t] / softcap);
      mx = std::max(mx, s[t]);
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; ++t) {
      s[t] = fast_exp(s[t] - mx);
      sum += s[t];
    }
    float* o = out + h * D;
    std::fill(o, o + D, 0.0f);
    const float inv = 1.0f / sum;
    for (int64_t t = 0; t < n; ++t) {
      const float p = s[t] * inv;
      const float* vt = vh + t * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) o[i] += p * vt[i];
    }
  }
}

void silu_mul(const float* gu, int64_t I, float* y) {
#pragma omp simd
  for (int64_t i = 0; i < I; ++i) {
    const float g = gu[i];
    y[i] = g / (1.0f + fast_exp(-g)) * gu[I + i];
  }
}

void gelu_tanh_mul(const float* gu, int64_t I, float* y) {
  const float c = 0.7978845608028654f;  // sqrt(2 / pi)
#pragma omp simd
  for (int64_t i = 0; i < I; ++i) {
    const float g = gu[i];
    y[i] = 0.5f * g * (1.0f + fast_tanh(c * (g + 0.044715f * g * g * g))) * gu[I + i];
  }
}

}  // namespace cpu
}  // namespace dbquant
