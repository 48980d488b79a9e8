"""Random packed linears and the parity check shared by the GPU kernel tests (Triton, CUDA).

Every helper takes the device the kernel under test reads from; the reference
(:func:`dbquant.backends.reference.dbgemm_ref`) always runs on the CPU in float32.
"""

from __future__ import annotations

import torch

from dbquant.backends.reference import dbgemm_ref
from dbquant.format.layout import pack_bits, unpack_bits
from tests.tolerances import KERNEL_REL_ERR


def make_layer(n, k, g, offset, bias, device, seed=0, pad_garbage=False, planes=2):
    """A random canonical packed linear of ``planes`` bit planes on ``device``:
    (qweight uint8 [planes, N, Kp/8], scales float16 [N, G, planes], offset float16 [N, G] or None,
    bias float32 [N] or None). ``pad_garbage`` sets bits in the padded channels K..Kp-1."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // g)
    bits = torch.randint(0, 2, (planes, n, groups * g), generator=gen)
    if not pad_garbage:
        bits[..., k:] = 0  # the format: padded channels hold 0
    scales = torch.randn(n, groups, planes, generator=gen).half()
    off = torch.randn(n, groups, generator=gen).half() if offset else None
    b = torch.randn(n, generator=gen) if bias else None
    return tuple(None if t is None else t.to(device) for t in (pack_bits(bits), scales, off, b))


def make_x(m, k, dtype, device, seed=1):
    """Random activations ``dtype`` [m, k] on ``device``."""
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def rel_err(y, ref):
    """||y - ref|| / ||ref|| in float32, as a Python float."""
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def check(y, x, layer, k, g):
    """y matches the CPU reference on the same inputs, within x's dtype's tolerance."""
    qweight, scales, off, b = (None if t is None else t.cpu() for t in layer)
    ref = dbgemm_ref(x.cpu(), qweight, scales, off, b, k, g)
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    err = rel_err(y.cpu(), ref)
    assert err < KERNEL_REL_ERR[x.dtype], f"relative error {err:.2e} >= {KERNEL_REL_ERR[x.dtype]:.0e}"


def assert_bugs_are_caught(y, x, layer, k, g):
    """y (the kernel's output for x on ``layer``, bias None) is more than 10x the float16 tolerance
    away from what a kernel with a typical bug would give: bits read MSB first, the next group's
    scales, the offset dropped, the planes swapped. So the parity tests would fail on such a bug."""
    qweight, scales, off, _ = (None if t is None else t.cpu() for t in layer)
    xc, n = x.cpu(), qweight.shape[1]
    msb_first = pack_bits(unpack_bits(qweight).reshape(2, n, -1, 8).flip(-1).reshape(2, n, -1))
    wrong = {
        "msb-first bits": dbgemm_ref(xc, msb_first, scales, off, None, k, g),
        "next group's scales": dbgemm_ref(xc, qweight, torch.roll(scales, 1, dims=1), off, None, k, g),
        "offset dropped": dbgemm_ref(xc, qweight, scales, None, None, k, g),
        "planes swapped": dbgemm_ref(xc, qweight.flip(0), scales, off, None, k, g),
    }
    for what, ref in wrong.items():
        assert rel_err(y.cpu(), ref) > 10 * KERNEL_REL_ERR[torch.float16], what
