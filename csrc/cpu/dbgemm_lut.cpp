// Scalar lookup-table implementation of the dual-binary GEMM; see dbgemm_lut.h for the
// format and the algorithm. Torch-free on purpose: it compiles in about a second and
// can be unit-compiled alone (g++ -std=c++17 -O3 -c dbgemm_lut.cpp).

#include "dbgemm_lut.h"

#include <algorithm>
#include <vector>

namespace dbquant {
namespace cpu {

namespace {

// Output rows per block in dbgemm_lut_rows. A block's weight bytes (2 * 32 * Kp/8, 9 KiB
// for K = 576) stay in L1 while every activation row's table streams past them once,
// instead of re-reading all M tables for each single output row.
constexpr int64_t kRowBlock = 32;

// Table of one 8-channel chunk: t[b] = sum of xs[j] over the set bits j of b.
// Equivalent to the recursion t[b] = t[b & (b - 1)] + xs[ctz(b)] (peel the lowest bit);
// here we peel the highest bit instead: the entries [2^j, 2^(j+1)) are the entries
// [0, 2^j) plus xs[j]. Same 255 additions, but no ctz, no branch, and the inner loop
// is a plain vector add the compiler can vectorise. Each t[b] adds the selected
// activations in increasing channel order.
inline void build_one(const float xs[8], float* t) {
  t[0] = 0.0f;
  for (int j = 0; j < 8; ++j) {
    const int half = 1 << j;
    const float v = xs[j];
    for (int i = 0; i < half; ++i) t[half + i] = t[i] + v;
  }
}

}  // namespace

void build_luts(const float* x, int64_t K, float* lut, int64_t m0, int64_t m1, int64_t c0,
                int64_t c1) {
  const int64_t lf = lut_floats(K);
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * K;
    float* lr = lut + m * lf;
    for (int64_t c = c0; c < c1; ++c) {
      // x is not padded: the last chunk may hold fewer than 8 real channels; the rest
      // are 0 so that whatever their weight bits are, they add nothing.
      float xs[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      const int64_t k0 = 8 * c;
      const int64_t nk = std::min<int64_t>(8, K - k0);
      for (int64_t j = 0; j < nk; ++j) xs[j] = xr[k0 + j];
      build_one(xs, lr + c * 256);
    }
  }
}

void group_sums(const float* lut, int64_t K, int64_t group_size, float* gsum, int64_t m0,
                int64_t m1) {
  const int64_t kc = num_chunks(K);
  const int64_t lf = lut_floats(K);
  const int64_t cpg = group_size / 8;  // chunks per group (group_size is a multiple of 8)
  const int64_t G = (K + group_size - 1) / group_size;
  for (int64_t m = m0; m < m1; ++m) {
    const float* lr = lut + m * lf;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t cb = g * cpg;
      const int64_t ce = std::min(cb + cpg, kc);
      float s = 0.0f;
      for (int64_t c = cb; c < ce; ++c) s += lr[c * 256 + 255];  // all 8 bits set
      gsum[m * G + g] = s;
    }
  }
}

void dbgemm_lut_rows(const float* lut, const float* gsum, int64_t M, const uint8_t* qweight,
                     const float* scales, const float* offset, const float* bias, int64_t N,
                     int64_t K, int64_t group_size, float* y, int64_t n0, int64_t n1) {
  const int64_t kc = num_chunks(K);
  const int64_t lf = lut_floats(K);
  const int64_t cpg = group_size / 8;
  const int64_t G = (K + group_size - 1) / group_size;
  const int64_t row_bytes = G * cpg;  // Kp / 8
  const uint8_t* plane1 = qweight + N * row_bytes;

  for (int64_t nb = n0; nb < n1; nb += kRowBlock) {
    const int64_t ne = std::min(nb + kRowBlock, n1);
    for (int64_t m = 0; m < M; ++m) {
      const float* L = lut + m * lf;
      const float* gs = offset ? gsum + m * G : nullptr;
      float* yr = y + m * N;
      for (int64_t n = nb; n < ne; ++n) {
        const uint8_t* q0 = qweight + n * row_bytes;
        const uint8_t* q1 = plane1 + n * row_bytes;
        const float* sc = scales + n * G * 2;
        float acc = 0.0f;
        for (int64_t g = 0; g < G; ++g) {
          // Only chunks with a real channel are read: bytes past ceil(K/8) are padding.
          // Every group holds at least one real channel since Kp = ceil(K/g)*g.
          const int64_t cb = g * cpg;
          const int64_t ce = std::min(cb + cpg, kc);
          // Two partial sums per plane: four independent add chains hide the latency
          // of the dependent table loads.
          float s1a = 0.0f, s1b = 0.0f, s2a = 0.0f, s2b = 0.0f;
          int64_t c = cb;
          for (; c + 1 < ce; c += 2) {
            s1a += L[c * 256 + q0[c]];
            s2a += L[c * 256 + q1[c]];
            s1b += L[(c + 1) * 256 + q0[c + 1]];
            s2b += L[(c + 1) * 256 + q1[c + 1]];
          }
          if (c < ce) {
            s1a += L[c * 256 + q0[c]];
            s2a += L[c * 256 + q1[c]];
          }
          acc += sc[2 * g] * (s1a + s1b) + sc[2 * g + 1] * (s2a + s2b);
          if (offset) acc += offset[n * G + g] * gs[g];
        }
        yr[n] = bias ? acc + bias[n] : acc;
      }
    }
  }
}

void dbgemm_lut(const float* x, int64_t M, int64_t K, const uint8_t* qweight,
                const float* scales, const float* offset, const float* bias, int64_t N,
                int64_t group_size, float* y) {
  if (M <= 0 || N <= 0) return;
  std::vector<float> lut(static_cast<size_t>(M * lut_floats(K)));
  build_luts(x, K, lut.data(), 0, M, 0, num_chunks(K));
  std::vector<float> gsum;
  if (offset) {
    gsum.resize(static_cast<size_t>(M * ((K + group_size - 1) / group_size)));
    group_sums(lut.data(), K, group_size, gsum.data(), 0, M);
  }
  dbgemm_lut_rows(lut.data(), offset ? gsum.data() : nullptr, M, qweight, scales, offset, bias,
                  N, K, group_size, y, 0, N);
}

}  // namespace cpu
}  // namespace dbquant
