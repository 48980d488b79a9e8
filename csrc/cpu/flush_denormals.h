// FlushDenormals: flush-to-zero and denormals-are-zero for the calling thread while it lives (the x86
// MXCSR; nothing elsewhere), restored on exit.
//
// Why: the build's -fno-trapping-math lets GCC vectorise fast_exp's clamp (fast_exp.h) by evaluating
// every branch for every lane and blending, and some branches fold to constants whose products are
// subnormal for ordinary inputs: SiLU's clamped branch is g / (1 + e^88), subnormal for any |g| < 2.
// Each subnormal result costs a microcode assist: SmolLM2's SiLU (I = 1536) took 10.0 us instead of
// 1.2 us on AVX-512 (AVX2 15.7 -> 1.2, SSE2 33.5 -> 3.6; docs/RESULTS.md). Flushing changes only
// values below 1.2e-38 in magnitude, to zero.
#pragma once

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#include <xmmintrin.h>
#define DBQUANT_HAVE_MXCSR 1
#endif

namespace dbquant {
namespace cpu {

class FlushDenormals {
 public:
#ifdef DBQUANT_HAVE_MXCSR
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFtz | kDaz); }
  ~FlushDenormals() { _mm_setcsr(saved_); }
#endif
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
#ifdef DBQUANT_HAVE_MXCSR
  static constexpr unsigned kFtz = 0x8000, kDaz = 0x0040;  // MXCSR bits 15 and 6
  unsigned saved_;
#endif
};

}  // namespace cpu
}  // namespace dbquant
