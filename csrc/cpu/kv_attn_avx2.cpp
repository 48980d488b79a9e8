// AVX2 + FMA path of the packed-KV attention kernels (kv_attn.h): kv_attn_impl.h's loops compiled
// for AVX2 by the pragma; called only after a run-time CPU check (kv_attn.cpp).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#pragma GCC target("avx2,fma")
#define KV_NS kv_avx2
#include "kv_attn_impl.h"
