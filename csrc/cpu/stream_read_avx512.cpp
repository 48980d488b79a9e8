// AVX-512 path of the streaming read kernel (stream_read.h): 64-byte loads (one cache line
// each), four accumulators (256 bytes per iteration). Compiled for AVX-512F by the pragma;
// called only after a run-time CPU check.

#pragma GCC target("avx512f,avx2")

#include <immintrin.h>

#include "prefetch.h"
#include "stream_read.h"

namespace dbquant {
namespace cpu {

uint64_t xor_words_avx512(const uint8_t* p, int64_t nbytes) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 256 <= nbytes; i += 256) {
    // the GEMV kernels prefetch their weight streams, so the read they are measured against does too,
    // into L2: on AMD Zen 4 that read 15-20% faster than into L1 at 1 and 2 threads (docs/RESULTS.md,
    // "Prefetching the integer-table kernel's streams into L2"), and the peak should be the best read
    for (int j = 0; j < 256; j += 64) prefetch_ahead_l2(p + i + j);
    a0 = _mm512_xor_si512(a0, _mm512_loadu_si512((const void*)(p + i)));
    a1 = _mm512_xor_si512(a1, _mm512_loadu_si512((const void*)(p + i + 64)));
    a2 = _mm512_xor_si512(a2, _mm512_loadu_si512((const void*)(p + i + 128)));
    a3 = _mm512_xor_si512(a3, _mm512_loadu_si512((const void*)(p + i + 192)));
  }
  a0 = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
  alignas(64) uint64_t lanes[8];
  _mm512_store_si512((void*)lanes, a0);
  uint64_t r = 0;
  for (int j = 0; j < 8; ++j) r ^= lanes[j];
  return r ^ xor_words_scalar(p + i, nbytes - i);
}

}  // namespace cpu
}  // namespace dbquant
