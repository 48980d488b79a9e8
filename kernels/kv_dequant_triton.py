"""Triton kernels that dequantize the packed KV-cache formats of ``dbquant/runtime/kv/quantizers.py``:
kernels only (the wrappers that check, allocate and launch are in ``dbquant/runtime/kv/triton_dequant.py``).

Every kernel gets one program per block ``r`` (a flattened (batch, head, group) index)
and writes that block's fp32 values ``out[r, g, c]`` (G tokens x C channels, row-major):

* :func:`ternary_dequant_kernel`: ``trits`` uint8 [R, NB], 5 base-3 digits per byte,
  element ``i = c * G + g`` in byte ``i // 5``, digit ``i % 5`` (digit = code + 1);
  ``out = scale[r, c] * code``.
* :func:`asym2_dequant_kernel`: ``codes`` uint8 [R, C, G/4], token ``g`` of channel ``c``
  at bits ``2 * (g % 4)`` of byte ``g // 4``; ``out = min[r, c] + scale[r, c] * q``.
* :func:`sign1_dequant_kernel`: ``bits`` uint8 [R, C, G/8], bit ``g % 8`` of byte ``g // 8``;
  ``out = scale[r, c] * (2b - 1)``.

Scales arrive as fp32 [R, C] (the wrapper resolves fp16 / fp8-with-factor storage), so a
kernel reads each packed byte once and the scales once per element. One block per
program is small (G*C <= a few thousand elements): the decode is memory-bound and a
whole block fits in registers.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def ternary_dequant_kernel(trits_ptr, scale_ptr, out_ptr, NB, C: tl.constexpr, G: tl.constexpr,
                           BLOCK: tl.constexpr):
    r = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    m = i < C * G
    byte = tl.load(trits_ptr + r * NB + i // 5, mask=m, other=0).to(tl.int32)
    d = i % 5
    p = tl.where(d == 0, 1, tl.where(d == 1, 3, tl.where(d == 2, 9, tl.where(d == 3, 27, 81))))
    code = ((byte // p) % 3 - 1).to(tl.float32)
    c = i // G
    g = i % G
    s = tl.load(scale_ptr + r * C + c, mask=m, other=0.0)
    tl.store(out_ptr + r * G * C + g * C + c, s * code, mask=m)


@triton.jit
def asym2_dequant_kernel(codes_ptr, min_ptr, scale_ptr, out_ptr, C: tl.constexpr, G: tl.constexpr,
                         BLOCK: tl.constexpr):
    r = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    m = i < C * G
    c = i // G
    g = i % G
    byte = tl.load(codes_ptr + r * C * (G // 4) + c * (G // 4) + g // 4, mask=m, other=0).to(tl.int32)
    q = ((byte >> (2 * (g % 4))) & 3).to(tl.float32)
    mn = tl.load(min_ptr + r * C + c, mask=m, other=0.0)
    s = tl.load(scale_ptr + r * C + c, mask=m, other=0.0)
    tl.store(out_ptr + r * G * C + g * C + c, mn + s * q, mask=m)


@triton.jit
def sign1_dequant_kernel(bits_ptr, scale_ptr, out_ptr, C: tl.constexpr, G: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    m = i < C * G
    c = i // G
    g = i % G
    byte = tl.load(bits_ptr + r * C * (G // 8) + c * (G // 8) + g // 8, mask=m, other=0).to(tl.int32)
    b = ((byte >> (g % 8)) & 1).to(tl.float32)
    s = tl.load(scale_ptr + r * C + c, mask=m, other=0.0)
    tl.store(out_ptr + r * G * C + g * C + c, s * (2.0 * b - 1.0), mask=m)
