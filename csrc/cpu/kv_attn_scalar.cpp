// Portable path of the packed-KV attention kernels (kv_attn.h): the generic loops of
// kv_attn_impl.h under the build's default flags (SSE2 on x86-64).
#define KV_NS kv_scalar
#include "kv_attn_impl.h"
