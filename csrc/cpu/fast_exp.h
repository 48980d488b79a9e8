// exp(x) and softmax for the torch-free CPU ops (decode_ops_impl.h, kv_attn_impl.h), header-only on purpose:
// the function has internal linkage (anonymous namespace), so each translation unit compiles its
// own copy for the ISA its `#pragma GCC target` names, and the linker never picks an AVX-512 copy
// for the scalar path.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace dbquant {
namespace cpu {
namespace {

// exp(x) to a few float ulps for x in [-87, 88] (clamped outside): Cephes' expf
// polynomial on x - n ln2, times 2^n built in the exponent bits. Branch- and call-free, so
// `omp simd` loops vectorise it (a rounding written as a conditional or an int conversion kept
// GCC from it: such loops ran scalar); libm's expf is a scalar call (~25 ns here), and a decode
// step takes ~100k of them (softmax and SiLU).
inline float fast_exp(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: fx + kRound rounds fx to an integer (half to even)
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float fx = x * 1.44269504088896341f;
  const float t = fx + kRound;  // in [2^23, 2^24): its mantissa's low bits hold n = round(fx)
  int32_t tb;
  std::memcpy(&tb, &t, sizeof tb);
  const int32_t n = tb - 0x4B400000;  // the bits of kRound
  const float nf = t - kRound;        // exact
  const float r = (x - nf * 0.693359375f) - nf * -2.12194440e-4f;  // ln2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// s[0..n) <- softmax(s) in place: the max subtracted, fast_exp, one division (the sum in `omp simd` order).
inline void softmax_inplace(float* s, int64_t n) {
  float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;  // std::max (a reference) kept GCC 12 scalar here
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    s[j] = fast_exp(s[j] - mx);
    sum += s[j];
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
}

}  // namespace
}  // namespace cpu
}  // namespace dbquant
