"""Wrappers for the packed KV-cache dequant kernels in ``kernels/kv_dequant_triton.py``.

Each mirrors a ``dequantize_*`` of :mod:`dbquant.runtime.kv.quantizers` (same packed dict in, same
fp32 [..., G, C] out) and is tested against it under ``TRITON_INTERPRET=1``. Optional: the
cache itself dequantizes with the PyTorch functions; these are for GPU serving.
"""

from __future__ import annotations

import torch

from ...errors import DbquantError
from .quantizers import load_scales


def _kernels():
    try:
        from dbquant.kernels import kv_dequant_triton as K
    except ImportError as e:  # triton missing
        raise DbquantError(f"the Triton KV dequant kernels need triton ({e})") from None
    return K


def _launch_shape(lead, c: int, g: int):
    r = 1
    for n in lead:
        r *= n
    return r, triton_block(c * g)


def triton_block(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


def dequantize_ternary(q: dict, group: int) -> torch.Tensor:
    K = _kernels()
    s = load_scales(q, "scale").contiguous()
    lead, c = s.shape[:-1], s.shape[-1]
    trits = q["trits"].contiguous()
    r, block = _launch_shape(lead, c, group)
    out = torch.empty(*lead, group, c, dtype=torch.float32, device=s.device)
    K.ternary_dequant_kernel[(r,)](trits, s, out, trits.shape[-1], C=c, G=group, BLOCK=block)
    return out


def dequantize_asym2(q: dict) -> torch.Tensor:
    K = _kernels()
    mn, s = load_scales(q, "min").contiguous(), load_scales(q, "scale").contiguous()
    codes = q["codes"].contiguous()
    lead, c, g = mn.shape[:-1], mn.shape[-1], codes.shape[-1] * 4
    r, block = _launch_shape(lead, c, g)
    out = torch.empty(*lead, g, c, dtype=torch.float32, device=s.device)
    K.asym2_dequant_kernel[(r,)](codes, mn, s, out, C=c, G=g, BLOCK=block)
    return out


def dequantize_sign1(q: dict) -> torch.Tensor:
    K = _kernels()
    s = load_scales(q, "scale").contiguous()
    bits = q["bits"].contiguous()
    lead, c, g = s.shape[:-1], s.shape[-1], bits.shape[-1] * 8
    r, block = _launch_shape(lead, c, g)
    out = torch.empty(*lead, g, c, dtype=torch.float32, device=s.device)
    K.sign1_dequant_kernel[(r,)](bits, s, out, C=c, G=g, BLOCK=block)
    return out
