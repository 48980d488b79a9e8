// AVX2 + FMA (+ F16C, for float16 caches) path of the decode-step ops (decode_ops.h): decode_ops_impl.h's loops compiled for AVX2 by
// the pragma; called only after a run-time CPU check (decode_ops.cpp).
#pragma GCC target("avx2,fma,f16c")
#define DO_NS do_avx2
#define DO_VEC 256
#include "decode_ops_impl.h"
