// Scalar path of the streaming read kernel (stream_read.h): 8-byte words, four independent
// accumulators so the loads, not the XOR chain, set the pace. Also the tail of the SIMD paths.

#include <cstring>

#include "stream_read.h"

namespace dbquant {
namespace cpu {

uint64_t xor_words_scalar(const uint8_t* p, int64_t nbytes) {
  uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, w[4];
  int64_t i = 0;
  for (; i + 32 <= nbytes; i += 32) {
    std::memcpy(w, p + i, 32);  // memcpy: unaligned-safe, compiles to plain loads
    a0 ^= w[0];
    a1 ^= w[1];
    a2 ^= w[2];
    a3 ^= w[3];
  }
  for (; i + 8 <= nbytes; i += 8) {
    std::memcpy(w, p + i, 8);
    a0 ^= w[0];
  }
  if (i < nbytes) {  // the partial last word, zero-padded (x86 is little-endian)
    w[0] = 0;
    std::memcpy(w, p + i, size_t(nbytes - i));
    a0 ^= w[0];
  }
  return a0 ^ a1 ^ a2 ^ a3;
}

}  // namespace cpu
}  // namespace dbquant
