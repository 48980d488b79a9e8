// The packed-KV attention kernels of kv_attn.h as plain C++ loops, written so the compiler
// vectorises them: kv_attn_{scalar,avx2,avx512}.cpp each include this file once, under their own
// `#pragma GCC target`, with KV_NS naming the path's namespace (kv_attn.cpp dispatches at run time).
// Not a public header: no include guard on purpose (one inclusion per path).

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "fast_exp.h"
#include "kv_attn.h"

namespace dbquant {
namespace cpu {
namespace KV_NS {

namespace {

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
    for (int64_t c = 0; c < kv.D; ++c) {  // branch-free: the mask bits are random
      const int64_t bit = (m[c >> 3] >> (c & 7)) & 1;
      aidx[ia] = int32_t(c);
      nidx[in] = int32_t(c);
      ia += bit;
      in += 1 - bit;
    }
  } else {
    for (int64_t c = 0; c < kv.D; ++c) (kv.na ? aidx : nidx)[c] = int32_t(c);
  }
}

// GCC vector types: one FMA per 4 / 8 / 16 floats on whatever ISA this file is compiled for, and
// small arrays of them stay in registers (the loops below are fully unrolled at G = 32, D = 64).
typedef float v4 __attribute__((vector_size(16)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v16 __attribute__((vector_size(64)));

template <typename V>
inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// out[t] = c + sum_j wa[j] code_jt + sum_i w2[i] bit_it over a group of 32 tokens, accumulated in
// registers (a running sum in memory would serialise on store-to-load forwarding).
inline void accumulate32(const KVTables& tb, float c, const uint8_t* codes, const float* wa, int64_t na,
                         const uint8_t* bits, const float* w2, int64_t nn, float* out) {
  v4 a[8];
  v8 b8[4];
  for (int k = 0; k < 8; ++k) a[k] = v4{} + c;
  for (int k = 0; k < 4; ++k) b8[k] = v8{};
  for (int64_t j = 0; j < na; ++j) {
    const uint8_t* cb = codes + j * 8;
    const v4 w = v4{} + wa[j];
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) a[k] += w * load<v4>(tb.two[cb[k]]);
  }
  for (int64_t i = 0; i < nn; ++i) {
    const uint8_t* bb = bits + i * 4;
    const v8 w = v8{} + w2[i];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) b8[k] += w * load<v8>(tb.one[bb[k]]);
  }
  for (int k = 0; k < 8; ++k) std::memcpy(out + 4 * k, &a[k], sizeof(v4));
  for (int k = 0; k < 4; ++k) {
    v8 o = load<v8>(out + 8 * k) + b8[k];
    std::memcpy(out + 8 * k, &o, sizeof o);
  }
}

}  // namespace

void scores_packed(const KVPackedView& kv, const float* q, int64_t T, int64_t Hq, float scale, float* scores,
                   int64_t ld, int64_t kh, int64_t g0, int64_t g1) {
  const KVTables& tb = kv_tables();
  const int64_t D = kv.D, G = kv.G, na = kv.na, nn = kv.nn, gq = Hq / kv.Hk;
  int32_t aidx[kKvMaxD], nidx[kKvMaxD];
  float amin[kKvMaxD], asc[kKvMaxD], ns[kKvMaxD], qn[kKvMaxD], wa[kKvMaxD];
  alignas(64) float wn[kKvMaxD];
  alignas(64) float acc[kKvMaxG];
  // fmat transposed, so the per-group query transform runs along its rows (no horizontal sums)
  std::vector<float> ft(nn * nn);
  for (int64_t i = 0; i < nn; ++i)
    for (int64_t j = 0; j < nn; ++j) ft[j * nn + i] = kv.fmat[i * nn + j];
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
        // the frequency-domain query wq = fmat @ q_normal; bit i of a token then weighs 2 wq_i s_i
        std::fill(wn, wn + nn, 0.0f);
        for (int64_t j = 0; j < nn; ++j) {
          const float qj = qn[j];
          const float* fr = ft.data() + j * nn;
#pragma omp simd
          for (int64_t i = 0; i < nn; ++i) wn[i] += fr[i] * qj;
        }
        for (int64_t i = 0; i < nn; ++i) {
          wn[i] *= ns[i];
          c -= wn[i];
        }
        if (G == 32) {
          for (int64_t i = 0; i < nn; ++i) wa[na + i] = 2.0f * wn[i];  // wa: room for D weights
          accumulate32(tb, c, codes, wa, na, bits, wa + na, nn, acc);
        } else {
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

void dequantize(const KVPackedView& kv, int64_t n_groups, float* keys, float* values, int64_t kh, int64_t g0,
                int64_t g1) {
  const KVTables& tb = kv_tables();
  const int64_t D = kv.D, G = kv.G, na = kv.na, nn = kv.nn;
  int32_t aidx[kKvMaxD], nidx[kKvMaxD];
  alignas(64) float y[kKvMaxD];
  alignas(64) float kn[kKvMaxD];
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t slot = kh * kv.NG + g;
    split_channels(kv, slot, aidx, nidx);
    const float* f = kv.factors + slot * 4;
    float* kg = keys + (kh * n_groups + g) * G * D;  // [G, D] rows of this group
    float* vg = values + (kh * n_groups + g) * G * D;
    for (int64_t j = 0; j < na; ++j) {
      const float mn = tb.fp8[kv.kmin[slot * na + j]] * f[0], sc = tb.fp8[kv.kscale[slot * na + j]] * f[1];
      const uint8_t* cb = kv.kcodes + (slot * na + j) * (G / 4);
      for (int64_t t = 0; t < G; ++t) kg[t * D + aidx[j]] = mn + sc * tb.two[cb[t >> 2]][t & 3];
    }
    for (int64_t t = 0; t < G; ++t) {  // normal channels: the token's coefficients @ fmat
      for (int64_t i = 0; i < nn; ++i) {
        const float s = tb.fp8[kv.nscale[slot * nn + i]] * f[2];
        y[i] = s * (2.0f * tb.one[kv.nbits[(slot * nn + i) * (G / 8) + (t >> 3)]][t & 7] - 1.0f);
      }
      std::fill(kn, kn + nn, 0.0f);
      for (int64_t i = 0; i < nn; ++i) {
        const float yi = y[i];
        const float* fr = kv.fmat + i * nn;
#pragma omp simd
        for (int64_t j = 0; j < nn; ++j) kn[j] += yi * fr[j];
      }
      for (int64_t j = 0; j < nn; ++j) kg[t * D + nidx[j]] = kn[j];
    }
    const float fv = f[3];
    const uint8_t* tr = kv.vtrits + slot * kv.TB;
    const int64_t tb5 = (D + 4) / 5;
    for (int64_t t = 0; t < G; ++t)
      for (int64_t c = 0; c < D; ++c)
        vg[t * D + c] = tb.fp8[kv.vscale[slot * D + c]] * fv * tb.three[tr[t * tb5 + c / 5]][c % 5];
    if (g == 0)
      for (int64_t i = 0; i < kv.S; ++i) {
        std::copy(kv.sink_k + (kh * kv.S + i) * D, kv.sink_k + (kh * kv.S + i + 1) * D, kg + i * D);
        std::copy(kv.sink_v + (kh * kv.S + i) * D, kv.sink_v + (kh * kv.S + i + 1) * D, vg + i * D);
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
      softmax_inplace(s, np + vis);
    }
  }
}

void values_packed(const KVPackedView& kv, const float* p, int64_t T, int64_t Hq, int64_t ld, float* out,
                   int64_t kh, int64_t g0, int64_t g1) {
  const KVTables& tb = kv_tables();
  const int64_t D = kv.D, G = kv.G, gq = Hq / kv.Hk, tb5 = (D + 4) / 5;
  alignas(64) float row[kKvMaxD + 5];  // one token's trits, decoded 5 channels per byte
  alignas(64) float acc[kKvMaxD];
  float vs[kKvMaxD];
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t slot = kh * kv.NG + g;
    const float f = kv.factors[slot * 4 + 3];
    for (int64_t c = 0; c < D; ++c) vs[c] = tb.fp8[kv.vscale[slot * D + c]] * f;
    const uint8_t* tr = kv.vtrits + slot * kv.TB;
    const int64_t i0 = g == 0 ? kv.S : 0;  // the sink's rows are added exactly below, not from codes
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t hh = 0; hh < gq; ++hh) {
        const int64_t h = kh * gq + hh;
        const float* pr = p + (t * Hq + h) * ld + g * G;
        if (D == 64) {  // the same, per byte: 13 sums of 5 channels (padded to 8) kept in registers, each
          // byte's table row loaded straight into an FMA (no decoded row to store and reload)
          v8 r8[13] = {};
          for (int64_t i = i0; i < G; ++i) {
            const uint8_t* b = tr + i * 13;
            const v8 w = v8{} + pr[i];
#pragma GCC unroll 13
            for (int k = 0; k < 13; ++k) r8[k] += w * load<v8>(tb.three8[b[k]]);
          }
          float tmp[13 * 8];
          std::memcpy(tmp, r8, sizeof r8);
          for (int64_t c = 0; c < 64; ++c) acc[c] = tmp[(c / 5) * 8 + c % 5];
        } else {
        std::fill(acc, acc + D, 0.0f);
        for (int64_t i = i0; i < G; ++i) {  // acc[c] = sum_i p_i trit_ic, one token row at a time
          const uint8_t* b = tr + i * tb5;
          for (int64_t j = 0; j < tb5; ++j) std::memcpy(row + 5 * j, tb.three[b[j]], 5 * sizeof(float));
          const float w = pr[i];
#pragma omp simd
          for (int64_t c = 0; c < D; ++c) acc[c] += w * row[c];
        }
        }
        float* o = out + (t * Hq + h) * D;
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) o[c] += vs[c] * acc[c];
        if (g == 0)
          for (int64_t i = 0; i < kv.S; ++i) {
            const float* sv = kv.sink_v + (kh * kv.S + i) * D;
            const float w = pr[i];
#pragma omp simd
            for (int64_t c = 0; c < D; ++c) o[c] += w * sv[c];
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
