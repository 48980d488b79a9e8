// AVX-512 path of the packed-KV attention kernels (kv_attn.h): kv_attn_impl.h's loops compiled
// for AVX-512F/BW/VL by the pragma; called only after a run-time CPU check (kv_attn.cpp).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define KV_NS kv_avx512
#include "kv_attn_impl.h"
