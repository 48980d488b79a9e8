// The loops of the decode-step ops (decode_ops.h), included by three translation units, each compiled
// for its ISA by its own pragma (decode_ops_scalar.cpp: the build's SSE2; decode_ops_avx2.cpp;
// decode_ops_avx512.cpp), as kv_attn_impl.h is. Plain C++: `omp simd` (the build has -fopenmp) lets
// the compiler vectorise the elementwise loops at the width its pragma allows. The attention is written
// with one small vector type (Vec, AVX-512 or AVX2) instead: GCC 12 ends an `omp simd` dot product with
// 16 dependent scalar adds through the stack, and keeps `o += p v` in memory from one row to the next.
// (Compiled for the build's SSE2 only, the attention of a SmolLM2 step took ~2 ms of its ~10 at 1
// thread and 160 positions; docs/RESULTS.md.)
// Needs DO_NS (the namespace of this copy) defined before inclusion, and DO_VEC as 512 or 256 in the
// AVX-512 and AVX2 copies (GCC's target pragma does not define __AVX512F__ / __AVX2__).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "fast_exp.h"

#if defined(DO_VEC)
#include <immintrin.h>
#endif

namespace dbquant {
namespace cpu {
namespace DO_NS {

namespace {

// tanh(x) = 1 - 2 / (exp(2x) + 1), through fast_exp (exact limits +-1 where it clamps).
inline float fast_tanh(float x) { return 1.0f - 2.0f / (fast_exp(2.0f * x) + 1.0f); }

// An IEEE float16 (its bits) as float32: exact, as vcvtph2ps (the caches' float16 rows on the portable path).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {  // zero or subnormal: m 2^-24
    const float f = float(m) * 5.9604644775390625e-08f;
    return sign ? -f : f;
  }
  const uint32_t bits = sign | (e == 0x1f ? 0x7f800000u | (m << 13) : ((e + 112) << 23) | (m << 13));
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Row r of a cache as float32: the row itself, or (float16 cache) its values widened into buf [D].
inline const float* cache_row(const float* r, int64_t, float*) { return r; }
inline const float* cache_row(const uint16_t* r, int64_t D, float* buf) {
  for (int64_t i = 0; i < D; ++i) buf[i] = half_to_float(r[i]);
  return buf;
}

inline float dot(const float* a, const float* b, int64_t D) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < D; ++i) s += a[i] * b[i];
  return s;
}

// s[0..n) <- softmax(softcap tanh(s / softcap)) (no cap where softcap <= 0), in place.
inline void softcap_softmax(float* s, int64_t n, float softcap) {
  if (softcap > 0.0f) {
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) s[t] = softcap * fast_tanh(s[t] / softcap);
  }
  softmax_inplace(s, n);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// W float lanes; load/store take the count of valid lanes n (the rest read as 0, not written).
#if DO_VEC == 512
struct Vec {
  static constexpr int64_t W = 16;
  __m512 v;
  static __mmask16 mask(int64_t n) { return n >= W ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec set1(float x) { return {_mm512_set1_ps(x)}; }
  static Vec load(const float* p, int64_t n) { return {_mm512_maskz_loadu_ps(mask(n), p)}; }
  // n float16 values (a float16 cache's row) widened to float32, exactly
  static Vec load(const uint16_t* p, int64_t n) {
    return {_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(n), p))};
  }
  void store(float* p, int64_t n) const { _mm512_mask_storeu_ps(p, mask(n), v); }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec mul(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
  static Vec add(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
  float sum() const { return _mm512_reduce_add_ps(v); }
  // Lane i = the sum of a[i]'s lanes, for all W vectors at once: a transpose-add (45 shuffles and adds
  // where W separate horizontal sums take ~130 and scalar stores).
  static Vec sums(const Vec* a) {
    __m512 y[4];
    for (int j = 0; j < 4; ++j) {  // y[j]'s 128-bit block b holds block b's sums of a[4j..4j+3]
      const __m512 *p = &a[4 * j].v, *r = &a[4 * j + 2].v;
      const __m512 x01 = _mm512_add_ps(_mm512_unpacklo_ps(p[0], p[1]), _mm512_unpackhi_ps(p[0], p[1]));
      const __m512 x23 = _mm512_add_ps(_mm512_unpacklo_ps(r[0], r[1]), _mm512_unpackhi_ps(r[0], r[1]));
      y[j] = _mm512_add_ps(_mm512_shuffle_ps(x01, x23, _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_ps(x01, x23, _MM_SHUFFLE(3, 2, 3, 2)));
    }
    const __m512 v01 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 v23 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(y[2], y[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return {_mm512_add_ps(_mm512_shuffle_f32x4(v01, v23, _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_f32x4(v01, v23, _MM_SHUFFLE(3, 1, 3, 1)))};
  }
};
#elif DO_VEC == 256
struct Vec {
  static constexpr int64_t W = 8;
  __m256 v;
  static __m256i mask(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min<int64_t>(n, W))),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static Vec zero() { return {_mm256_setzero_ps()}; }
  static Vec set1(float x) { return {_mm256_set1_ps(x)}; }
  static Vec load(const float* p, int64_t n) { return {n >= W ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask(n))}; }
  // n float16 values (a float16 cache's row) widened to float32, exactly (F16C)
  static Vec load(const uint16_t* p, int64_t n) {
    if (n >= W) return {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p))};
    alignas(16) uint16_t t[W] = {};
    std::memcpy(t, p, size_t(std::max<int64_t>(n, 0)) * sizeof(uint16_t));
    return {_mm256_cvtph_ps(_mm_load_si128((const __m128i*)t))};
  }
  void store(float* p, int64_t n) const {
    if (n >= W) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, mask(n), v);
  }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec mul(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
  static Vec add(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
  // Lane i = the sum of a[i]'s lanes, for all W vectors at once (a transpose-add, as the AVX-512 one).
  static Vec sums(const Vec* a) {
    __m256 y[2];
    for (int j = 0; j < 2; ++j) {  // y[j]'s 128-bit half h holds half h's sums of a[4j..4j+3]
      const __m256 *p = &a[4 * j].v, *r = &a[4 * j + 2].v;
      const __m256 x01 = _mm256_add_ps(_mm256_unpacklo_ps(p[0], p[1]), _mm256_unpackhi_ps(p[0], p[1]));
      const __m256 x23 = _mm256_add_ps(_mm256_unpacklo_ps(r[0], r[1]), _mm256_unpackhi_ps(r[0], r[1]));
      y[j] = _mm256_add_ps(_mm256_shuffle_ps(x01, x23, _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm256_shuffle_ps(x01, x23, _MM_SHUFFLE(3, 2, 3, 2)));
    }
    return {_mm256_add_ps(_mm256_permute2f128_ps(y[0], y[1], 0x20), _mm256_permute2f128_ps(y[0], y[1], 0x31))};
  }
  float sum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};
#endif

#if defined(DO_VEC)

// <a, b> over D floats with one horizontal sum at the end (the attention's dot products).
template <typename T>
inline float dot_vec(const float* a, const T* b, int64_t D) {
  Vec acc = Vec::zero();
  for (int64_t i = 0; i < D; i += Vec::W) acc = Vec::fma(Vec::load(a + i, D - i), Vec::load(b + i, D - i), acc);
  return acc.sum();
}

// o_h = sum_t p[h * n + t] v_t for heads [a, b): four vectors of o_h at a time stay in registers over
// all n rows (four independent FMA chains).
template <typename T>
void values_vec(const float* p, const T* vh, int64_t D, int64_t n, float* out, int64_t a, int64_t b) {
  constexpr int64_t W = Vec::W;
  for (int64_t h = a; h < b; ++h) {
    const float* ph = p + h * n;
    for (int64_t i = 0; i < D; i += 4 * W) {
      Vec o0 = Vec::zero(), o1 = Vec::zero(), o2 = Vec::zero(), o3 = Vec::zero();
      const int64_t r0 = D - i, r1 = r0 - W, r2 = r0 - 2 * W, r3 = r0 - 3 * W;  // lanes left (<= 0: none)
      for (int64_t t = 0; t < n; ++t) {
        const T* vt = vh + t * D + i;
        const Vec pt = Vec::set1(ph[t]);
        o0 = Vec::fma(pt, Vec::load(vt, r0), o0);
        if (r1 > 0) o1 = Vec::fma(pt, Vec::load(vt + W, r1), o1);
        if (r2 > 0) o2 = Vec::fma(pt, Vec::load(vt + 2 * W, r2), o2);
        if (r3 > 0) o3 = Vec::fma(pt, Vec::load(vt + 3 * W, r3), o3);
      }
      float* o = out + h * D + i;
      o0.store(o, r0);
      if (r1 > 0) o1.store(o + W, r1);
      if (r2 > 0) o2.store(o + 2 * W, r2);
      if (r3 > 0) o3.store(o + 3 * W, r3);
    }
  }
}

// The attention for heads of at most kMaxRowVecs vectors, unrolled at compile time on ND, the vectors
// a head's row takes (D in ((ND - 1) W, ND W]; the last one masked): wider heads take the loops above.
// The runtime-D loops spent most of their time on loop control and one horizontal sum per dot product
// (SmolLM2, 9 heads of 64 over 160 positions: 27 us a layer; docs/RESULTS.md has the step's figures).
constexpr int kMaxRowVecs = 16;
constexpr int kVecRegs = Vec::W == 16 ? 32 : 16;  // zmm / ymm registers

// scores[h * n + t] = scale <q_h, k_t> for heads [a, b) and key rows t < n of kh (rows of D floats):
// W rows' products in W registers, then one transpose-add (Vec::sums) for their W sums.
template <int ND, typename T>
void scores_nd(const float* q, const T* kh, int64_t D, int64_t n, float scale, float* scores, int64_t a,
               int64_t b) {
  constexpr int64_t W = Vec::W;
  const int64_t last = D - (ND - 1) * W;  // lanes of a row's last vector
  const Vec vscale = Vec::set1(scale);
  for (int64_t h = a; h < b; ++h) {
    Vec qv[ND];
    for (int d = 0; d < ND; ++d) qv[d] = Vec::load(q + h * D + d * W, d + 1 < ND ? W : last);
    float* s = scores + h * n;
    for (int64_t t0 = 0; t0 < n; t0 += W) {
      const int64_t rows = std::min<int64_t>(W, n - t0);
      Vec acc[W];
      for (int64_t r = 0; r < W; ++r) {
        acc[r] = Vec::zero();
        if (r >= rows) continue;
        const T* kt = kh + (t0 + r) * D;
        for (int d = 0; d < ND; ++d) acc[r] = Vec::fma(qv[d], Vec::load(kt + d * W, d + 1 < ND ? W : last), acc[r]);
      }
      Vec::mul(Vec::sums(acc), vscale).store(s + t0, rows);
    }
  }
}

// out_h = sum_t p[h * n + t] v_t for heads [a, b): o_h's ND vectors stay in registers, and two rows
// at a time (2 ND FMA chains) where the registers hold them.
template <int ND, typename T>
void values_nd(const float* p, const T* vh, int64_t D, int64_t n, float* out, int64_t a, int64_t b) {
  constexpr int64_t W = Vec::W;
  constexpr bool kTwoRows = 4 * ND <= kVecRegs;
  const int64_t last = D - (ND - 1) * W;
  for (int64_t h = a; h < b; ++h) {
    const float* ph = p + h * n;
    Vec o0[ND], o1[ND];
    for (int d = 0; d < ND; ++d) o0[d] = o1[d] = Vec::zero();
    int64_t t = 0;
    if (kTwoRows) {
      for (; t + 1 < n; t += 2) {
        const Vec p0 = Vec::set1(ph[t]), p1 = Vec::set1(ph[t + 1]);
        const T *v0 = vh + t * D, *v1 = v0 + D;
        for (int d = 0; d < ND; ++d) {
          const int64_t m = d + 1 < ND ? W : last;
          o0[d] = Vec::fma(p0, Vec::load(v0 + d * W, m), o0[d]);
          o1[d] = Vec::fma(p1, Vec::load(v1 + d * W, m), o1[d]);
        }
      }
    }
    for (; t < n; ++t) {
      const Vec p0 = Vec::set1(ph[t]);
      for (int d = 0; d < ND; ++d) o0[d] = Vec::fma(p0, Vec::load(vh + t * D + d * W, d + 1 < ND ? W : last), o0[d]);
    }
    for (int d = 0; d < ND; ++d) Vec::add(o0[d], o1[d]).store(out + h * D + d * W, d + 1 < ND ? W : last);
  }
}

// Heads [a, b) of one kv head through scores_nd and values_nd for the ND of D (nd = ceil(D / W));
// false, with nothing done, where D is wider than they unroll.
template <int ND = 1, typename T>
bool attend_nd(int64_t nd, const float* q, const T* kh, const T* vh, int64_t D, int64_t n, float scale,
               float softcap, float* scores, float* out, int64_t a, int64_t b) {
  if constexpr (ND > kMaxRowVecs) {
    return false;
  } else {
    if (nd != ND) return attend_nd<ND + 1, T>(nd, q, kh, vh, D, n, scale, softcap, scores, out, a, b);
    scores_nd<ND, T>(q, kh, D, n, scale, scores, a, b);
    for (int64_t h = a; h < b; ++h) softcap_softmax(scores + h * n, n, softcap);
    values_nd<ND, T>(scores, vh, D, n, out, a, b);
    return true;
  }
}

#endif

}  // namespace

void rms_norm_rows(const float* x, const float* w, float eps, int64_t D, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    const float inv = 1.0f / std::sqrt(dot(xr, xr, D) / float(D) + eps);  // the sum reassociated: fine for a norm
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * inv * w[i];
  }
}

void rope_rows(float* x, const float* cos, const float* sin, int64_t heads, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* xr = x + h * D;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float a = xr[i], b = xr[i + half];
      xr[i] = a * cos[i] - b * sin[i];
      xr[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

namespace {

// The query heads of one kv head are done together (grouped-query attention): each key and value row
// is read once for all of them, while it is in L1. T: the caches' element, float or float16 bits.
template <typename T>
void attend_heads(const float* q, const T* k, const T* v, int64_t Hq, int64_t Hk, int64_t L, int64_t D, int64_t n,
                  float scale, float softcap, float* scores, float* out, int64_t h0, int64_t h1) {
  const int64_t group = Hq / Hk;
#ifndef DO_VEC
  std::vector<float> row(std::is_same_v<T, float> ? 0 : D);  // a float16 row widened (the portable path)
#endif
  for (int64_t a = h0; a < h1;) {
    const int64_t j = a / group, b = std::min(h1, (j + 1) * group);  // heads [a, b) read kv head j
    const T* kh = k + j * L * D;
    const T* vh = v + j * L * D;
#ifdef DO_VEC
    if (attend_nd(ceil_div(D, Vec::W), q, kh, vh, D, n, scale, softcap, scores, out, a, b)) {
      a = b;
      continue;
    }
    for (int64_t t = 0; t < n; ++t)  // each key row read once for all the heads
      for (int64_t h = a; h < b; ++h) scores[h * n + t] = dot_vec(q + h * D, kh + t * D, D) * scale;
    for (int64_t h = a; h < b; ++h) softcap_softmax(scores + h * n, n, softcap);
    values_vec(scores, vh, D, n, out, a, b);
#else
    for (int64_t t = 0; t < n; ++t) {  // each key row read once for all the heads
      const float* kt = cache_row(kh + t * D, D, row.data());
      for (int64_t h = a; h < b; ++h) scores[h * n + t] = dot(q + h * D, kt, D) * scale;
    }
    for (int64_t h = a; h < b; ++h) softcap_softmax(scores + h * n, n, softcap);
    for (int64_t h = a; h < b; ++h) std::fill(out + h * D, out + (h + 1) * D, 0.0f);
    for (int64_t t = 0; t < n; ++t) {
      const float* vt = cache_row(vh + t * D, D, row.data());
      for (int64_t h = a; h < b; ++h) {
        const float p = scores[h * n + t];
        float* o = out + h * D;
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) o[i] += p * vt[i];
      }
    }
#endif
    a = b;
  }
}

}  // namespace

void attend_one_token(const float* q, const float* k, const float* v, int64_t Hq, int64_t Hk, int64_t L,
                      int64_t D, int64_t n, float scale, float softcap, float* scores, float* out, int64_t h0,
                      int64_t h1) {
  attend_heads(q, k, v, Hq, Hk, L, D, n, scale, softcap, scores, out, h0, h1);
}

void attend_one_token(const float* q, const uint16_t* k, const uint16_t* v, int64_t Hq, int64_t Hk, int64_t L,
                      int64_t D, int64_t n, float scale, float softcap, float* scores, float* out, int64_t h0,
                      int64_t h1) {
  attend_heads(q, k, v, Hq, Hk, L, D, n, scale, softcap, scores, out, h0, h1);
}

// torch.argmax of one row: blocks of 512 get their maximum (and whether they hold a NaN) in vector
// loops, then the first block holding the overall maximum is searched for its first occurrence.
int64_t argmax_row(const float* x, int64_t n) {
  constexpr int64_t kBlock = 512;
  float best = -INFINITY;
  int64_t best_block = -1;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t e = std::min(n, b0 + kBlock);
    float mx = -INFINITY;
    int nan = 0;
#pragma omp simd reduction(max : mx) reduction(| : nan)
    for (int64_t i = b0; i < e; ++i) {
      mx = x[i] > mx ? x[i] : mx;
      nan |= x[i] != x[i];
    }
    if (nan) {  // torch's argmax takes the first NaN as the maximum
      for (int64_t i = b0; i < e; ++i)
        if (x[i] != x[i]) return i;
    }
    if (best_block < 0 || mx > best) best = mx, best_block = b0;  // ties: the earlier block
  }
  for (int64_t i = best_block;; ++i)
    if (x[i] == best) return i;
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

void add_scaled(float* x, const float* y, float s, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] += y[i] * s;
}

}  // namespace DO_NS
}  // namespace cpu
}  // namespace dbquant
