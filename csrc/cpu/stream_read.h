// Torch-free streaming read kernel: the memory read bandwidth that `dbquant bench` relates its
// GEMV figures to (dbquant/bench/cpu.py). Each thread reads its contiguous share of a buffer with
// the widest loads the CPU has and folds it into a checksum, so no load can be optimised away.
//   buf      any bytes, nbytes long (no alignment needed)
//   checksum XOR of the buffer's 8-byte little-endian words, the last partial word zero-padded
//            (dbquant/backends/reference.py: stream_read_ref computes the same in PyTorch)
// XOR is exact and order-free, so every ISA path and every thread count give the same value;
// it costs one cheap integer op per loaded vector, leaving the loads as the only limit.
#pragma once

#include <cstdint>

#include "dbgemm_t16.h"  // Isa, isa_supported, best_isa

namespace dbquant {
namespace cpu {

// One thread's range [p, p + nbytes): the XOR of its 8-byte words, the partial tail zero-padded.
// The range must start at a multiple of 8 bytes from the buffer's start (stream_read does).
uint64_t xor_words_scalar(const uint8_t* p, int64_t nbytes);
uint64_t xor_words_avx2(const uint8_t* p, int64_t nbytes);
uint64_t xor_words_avx512(const uint8_t* p, int64_t nbytes);

// The whole buffer on `threads` OpenMP threads (each a contiguous chunk, a multiple of 4 KiB
// except the last) with the given ISA path.
uint64_t stream_read(Isa isa, const uint8_t* buf, int64_t nbytes, int threads);

}  // namespace cpu
}  // namespace dbquant
