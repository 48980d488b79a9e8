// Portable path of the decode-step ops (decode_ops.h): decode_ops_impl.h's loops under the build's
// default flags (SSE2 on x86-64).
#define DO_NS do_scalar
#include "decode_ops_impl.h"
