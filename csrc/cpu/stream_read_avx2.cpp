// AVX2 path of the streaming read kernel (stream_read.h): 32-byte loads, four accumulators
// (128 bytes per iteration) so several cache lines are in flight. Compiled for AVX2 by the
// pragma; called only after a run-time CPU check.

#pragma GCC target("avx2")

#include <immintrin.h>

#include "prefetch.h"
#include "stream_read.h"

namespace dbquant {
namespace cpu {

uint64_t xor_words_avx2(const uint8_t* p, int64_t nbytes) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 128 <= nbytes; i += 128) {
    prefetch_ahead(p + i);  // as the GEMV kernels do (stream_read_avx512.cpp)
    prefetch_ahead(p + i + 64);
    a0 = _mm256_xor_si256(a0, _mm256_loadu_si256((const __m256i*)(p + i)));
    a1 = _mm256_xor_si256(a1, _mm256_loadu_si256((const __m256i*)(p + i + 32)));
    a2 = _mm256_xor_si256(a2, _mm256_loadu_si256((const __m256i*)(p + i + 64)));
    a3 = _mm256_xor_si256(a3, _mm256_loadu_si256((const __m256i*)(p + i + 96)));
  }
  a0 = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256((__m256i*)lanes, a0);
  // lanes hold words at offsets 0, 8, 16, 24 (mod 32); XOR of all of them is the words' XOR
  return lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3] ^ xor_words_scalar(p + i, nbytes - i);
}

}  // namespace cpu
}  // namespace dbquant
