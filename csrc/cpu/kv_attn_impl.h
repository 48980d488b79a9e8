// The packed-KV attention kernels of kv_attn.h as plain C++ loops, written so the compiler
// vectorises them: kv_attn_{scalar,avx2,avx512}.cpp each include this file once, under their own
// `#pragma GCC target`, with KV_NS naming the path's namespace (kv_attn.cpp dispatches at run time).
// Not a public header: no include guard on purpose (one inclusion per path).

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kv_attn.h"

namespace dbquant {
namespace cpu {
namespace KV_NS {

namespace {

// exp(x) to a few float ulps (decode_ops.cpp's fast_exp, repeated so this path is compiled for
// its own ISA): Cephes' polynomial on x - n ln2, times 2^n built in the exponent bits.
inline float kv_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float fx = x * 1.44269504088896341f;
  const int32_t n = static_cast<int32_t>(fx + (fx >= 0.0f ? 0.5f : -0.5f));
  const float nf = static_cast<float>(n);
  const float r = (x - nf * 0.693359375f) - nf * -2.12194440e-4f;
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

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// The ascending anomalous / normal channel lists of slot `slot` (sizes na, nn).
void split_channels(const KVPackedView& kv, int64_t slot, int32_t* aidx, int32_t* nidx) {
  int64_t ia = 0, in = 0;
  if (kv.na > 0 && kv.nn > 0) {
    const uint8_t* m = kv.kmask + slot * (kv.D / 8);
    for (int64_t c = 0; c < kv.D; ++c) {
      if ((m[c >> 3] >> (c & 7)) & 1) aidx[ia++] = int32_t(c);
      else nidx[in++] = int32_t(c);
    }
  } else {
    for (int64_t c = 0; c < kv.D; ++c) (kv.na ? aidx : nidx)[c] = int32_t(c);
  }
}

}  // namespace

void scores_packed(const KVPackedView& kv, const float* q, int64_t T, int64_t Hq, float scale, float* scores,
                   int64_t ld, int64_t kh, int64_t g0, int64_t g1) {
  const KVTables& tb = kv_tables();
  const int64_t D = kv.D, G = kv.G, na = kv.na, nn = kv.nn, gq = Hq / kv.Hk;
  int32_t aidx[kKvMaxD], nidx[kKvMaxD];
  float amin[kKvMaxD], asc[kKvMaxD], ns[kKvMaxD], qn[kKvMaxD], wa[kKvMaxD], wn[kKvMaxD];
  alignas(64) float acc[kKvMaxG];
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t slot = kh * kv.NG + g;
    split_channels(kv, slot, aidx, nidx);
    const float* f = kv.factors + slot * 4;
    for (int64_t j = 0; j < na; ++j) {
      amin[j] = tb.fp8[kv.kmin[slot * na + j]] * f[0];
      asc[j] = tb.fp8[kv.kscale[slot * na + j]] * f[1];
    }
    for (int64_t i = 0; i < nn; ++i) ns[i] = tb.fp8[kv.nscale[slot * nn + i]] * f[2];
    const uint8_t* codes = kv.kcodes + slot * na * (G / 4);
    const uint8_t* bits = kv.nbits + slot * nn * (G / 8);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t hh = 0; hh < gq; ++hh) {
        const int64_t h = kh * gq + hh;
        const float* qh = q + (t * Hq + h) * D;
        float c = 0.0f;
        for (int64_t j = 0; j < na; ++j) {
          const float qa = qh[aidx[j]];
          wa[j] = qa * asc[j];
          c += qa * amin[j];
        }
        for (int64_t j = 0; j < nn; ++j) qn[j] = qh[nidx[j]];
        for (int64_t i = 0; i < nn; ++i) {
          // the frequency-domain query: wq_i = fmat[i, :] . q_normal; its bit weight 2 wq_i s_i
          wn[i] = dot(kv.fmat + i * nn, qn, nn) * ns[i];
          c -= wn[i];
        }
        for (int64_t i = 0; i < G; ++i) acc[i] = c;
        for (int64_t j = 0; j < na; ++j) {
          const uint8_t* cb = codes + j * (G / 4);
          const float w = wa[j];
          for (int64_t b = 0; b < G / 4; ++b) {
            const float* l = tb.two[cb[b]];
#pragma omp simd
            for (int r = 0; r < 4; ++r) acc[4 * b + r] += w * l[r];
          }
        }
        for (int64_t i = 0; i < nn; ++i) {
          const uint8_t* bb = bits + i * (G / 8);
          const float w = 2.0f * wn[i];
          for (int64_t b = 0; b < G / 8; ++b) {
            const float* l = tb.one[bb[b]];
#pragma omp simd
            for (int r = 0; r < 8; ++r) acc[8 * b + r] += w * l[r];
          }
        }
        float* out = scores + (t * Hq + h) * ld + g * G;
#pragma omp simd
        for (int64_t i = 0; i < G; ++i) out[i] = acc[i] * scale;
        if (g == 0)  // the sink's exact keys replace its rows of group 0
          for (int64_t i = 0; i < kv.S; ++i) out[i] = dot(qh, kv.sink_k + (kh * kv.S + i) * D, D) * scale;
      }
    }
  }
}

void scores_tail_softmax(const KVPackedView& kv, const float* q, int64_t T, int64_t Hq, float scale,
                         float* scores, int64_t ld, int64_t n_groups, int64_t n_tail, int64_t h0, int64_t h1) {
  const int64_t D = kv.D, gq = Hq / kv.Hk, np = n_groups * kv.G;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t vis = n_tail - T + t + 1;
    for (int64_t h = h0; h < h1; ++h) {
      const float* qh = q + (t * Hq + h) * D;
      const float* kt = kv.tail_k + (h / gq) * kv.TC * D;
      float* s = scores + (t * Hq + h) * ld;
      for (int64_t j = 0; j < vis; ++j) s[np + j] = dot(qh, kt + j * D, D) * scale;
      const int64_t n = np + vis;
      float mx = -INFINITY;
      for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) {
        s[j] = kv_exp(s[j] - mx);
        sum += s[j];
      }
      const float inv = 1.0f / sum;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) s[j] *= inv;
    }
  }
}

void values_packed(const KVPackedView& kv, const float* p, int64_t T, int64_t Hq, int64_t ld, int64_t n_groups,
                   float* out, int64_t kh, int64_t c0, int64_t c1) {
  const KVTables& tb = kv_tables();
  const int64_t D = kv.D, G = kv.G, gq = Hq / kv.Hk;
  const int64_t b0 = c0 * G / 5, b1 = (c1 * G + 4) / 5, base = b0 * 5;
  std::vector<float> buf((b1 - b0) * 5);
  float vs[kKvMaxD];
  alignas(64) float pz[kKvMaxG];
  for (int64_t g = 0; g < n_groups; ++g) {
    const int64_t slot = kh * kv.NG + g;
    const float f = kv.factors[slot * 4 + 3];
    for (int64_t c = c0; c < c1; ++c) vs[c - c0] = tb.fp8[kv.vscale[slot * D + c]] * f;
    const uint8_t* tr = kv.vtrits + slot * kv.TB;
    for (int64_t b = b0; b < b1; ++b) std::memcpy(&buf[(b - b0) * 5], tb.three[tr[b]], 5 * sizeof(float));
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t hh = 0; hh < gq; ++hh) {
        const int64_t h = kh * gq + hh;
        const float* pr = p + (t * Hq + h) * ld + g * G;
        const float* pg = pr;
        if (g == 0 && kv.S > 0) {  // the sink's rows: their exact values, not the codes
          std::copy(pr, pr + G, pz);
          std::fill(pz, pz + kv.S, 0.0f);
          pg = pz;
        }
        float* o = out + (t * Hq + h) * D;
        for (int64_t c = c0; c < c1; ++c) o[c] += vs[c - c0] * dot(pg, &buf[c * G - base], G);
        if (pg == pz)
          for (int64_t i = 0; i < kv.S; ++i) {
            const float* sv = kv.sink_v + (kh * kv.S + i) * D;
            for (int64_t c = c0; c < c1; ++c) o[c] += pr[i] * sv[c];
          }
      }
    }
  }
}

void values_tail(const KVPackedView& kv, const float* p, int64_t T, int64_t Hq, int64_t ld, int64_t n_groups,
                 int64_t n_tail, float* out, int64_t h0, int64_t h1) {
  const int64_t D = kv.D, gq = Hq / kv.Hk, np = n_groups * kv.G;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t vis = n_tail - T + t + 1;
    for (int64_t h = h0; h < h1; ++h) {
      const float* pr = p + (t * Hq + h) * ld + np;
      const float* vt = kv.tail_v + (h / gq) * kv.TC * D;
      float* o = out + (t * Hq + h) * D;
      for (int64_t j = 0; j < vis; ++j) {
        const float w = pr[j];
        const float* v = vt + j * D;
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) o[c] += w * v[c];
      }
    }
  }
}

}  // namespace KV_NS
}  // namespace cpu
}  // namespace dbquant
