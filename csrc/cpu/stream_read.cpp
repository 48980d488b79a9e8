// Threads and ISA dispatch of the streaming read kernel (stream_read.h).
// OpenMP with an explicit thread count (not at::parallel_for): the benchmark asks for a
// bandwidth at a given number of threads, independent of torch's own setting.

#include <omp.h>

#include <algorithm>

#include "stream_read.h"

namespace dbquant {
namespace cpu {

uint64_t stream_read(Isa isa, const uint8_t* buf, int64_t nbytes, int threads) {
  threads = std::max(1, threads);
  // chunks of whole 4 KiB pages: every chunk starts on a word boundary (the checksum's words
  // stay the buffer's words) and threads never share a page
  const int64_t page = 4096, pages = (nbytes + page - 1) / page;
  uint64_t total = 0;
#pragma omp parallel num_threads(threads) reduction(^ : total)
  {
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t b = std::min(nbytes, pages * id / nt * page), e = std::min(nbytes, pages * (id + 1) / nt * page);
    if (e > b) {
      switch (isa) {
        case Isa::Avx512: total ^= xor_words_avx512(buf + b, e - b); break;
        case Isa::Avx2: total ^= xor_words_avx2(buf + b, e - b); break;
        default: total ^= xor_words_scalar(buf + b, e - b); break;
      }
    }
  }
  return total;
}

}  // namespace cpu
}  // namespace dbquant
