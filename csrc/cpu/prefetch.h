// Software prefetch for the weight streams of the M = 1 (decode) kernels.
//
// At M = 1 every weight byte is read once per token, so a decode step is a stream of reads
// (~61 MB a token for SmolLM2: 2-bit linears and the int8 output head). The hardware
// prefetcher follows each stream, but stops at every 4 KiB page and must be trained again, and
// one core keeps only a few misses in flight: the GEMV kernels read 6-7 GB/s at 1 thread where a
// plain read loop reaches 8.5-9. A prefetch a fixed distance ahead of each load keeps the next
// pages in flight across those boundaries. The distance was chosen by measurement (docs/RESULTS.md,
// "Software prefetch in the decode kernels"): 2-8 KiB ahead all gave the same gain on the Xeon with
// AMX; 4 KiB sits in the middle. Prefetching past the end of an array is harmless (a prefetch never
// faults), so the loops need no bound checks.

#pragma once

#include <cstdint>

namespace dbquant {
namespace cpu {

constexpr int64_t kPrefetchBytes = 4096;

// Ask for the cache line kPrefetchBytes past p (read, keep in all cache levels).
inline void prefetch_ahead(const void* p) {
  __builtin_prefetch(static_cast<const char*>(p) + kPrefetchBytes, 0, 3);
}

// The same into L2 only (prefetcht1). The AVX-512 integer-table kernel reads each weight line
// once, a few hundred cycles after its prefetch, and L1's few miss buffers are better left to the
// loads themselves: on AMD Zen 4 the decode step ran 1.11x / 1.10x faster at 1 / 2 threads with
// this hint (and the scales prefetched too) than with prefetch_ahead's (docs/RESULTS.md,
// "Prefetching the integer-table kernel's streams into L2"). The int8 head's GEMV was no faster
// with it and stays on prefetch_ahead; the AVX2 path is unmeasured with it (no AVX2-only CPU here).
inline void prefetch_ahead_l2(const void* p) {
  __builtin_prefetch(static_cast<const char*>(p) + kPrefetchBytes, 0, 2);
}

}  // namespace cpu
}  // namespace dbquant
