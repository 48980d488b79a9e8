// AVX-512 path of the decode-step ops (decode_ops.h): decode_ops_impl.h's loops compiled for
// AVX-512F/BW/VL by the pragma; called only after a run-time CPU check (decode_ops.cpp).
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
// GCC 12 reports the undefined pass-through operand inside its own AVX-512 shuffle intrinsics as "may be
// used uninitialized" (Vec::sums); the operand is never read.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define DO_NS do_avx512
#define DO_VEC 512
#include "decode_ops_impl.h"
