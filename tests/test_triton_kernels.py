"""Parity of the Triton kernels (``kernels/dbgemm_triton.py`` via ``dbquant.backends.triton``) with
the reference ``dbgemm_ref``.

Without a GPU the kernels run on the CPU through Triton's interpreter: ``conftest.py``
sets ``TRITON_INTERPRET=1`` before anything imports them. With a GPU and
``TRITON_INTERPRET=0`` the same tests run the compiled kernels on CUDA tensors.
Shapes are small and blocks large, because the interpreter pays per program and per op.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dbquant.backends import registry
from dbquant.backends import triton as _triton  # noqa: E402
from dbquant.model.modules import PackedLinear  # noqa: E402
from tests import packed_case
from tests.packed_case import assert_bugs_are_caught, check, rel_err
from tests.tolerances import KERNEL_REL_ERR

if not _triton.load_triton():
    pytest.skip(f"the triton backend cannot run here: {_triton.unavailable_reason()}", allow_module_level=True)

DEVICE = "cpu" if _triton.interpreted() else "cuda"
# Relative error ||y - ref|| / ||ref|| allowed per activation dtype. fp32 is exact up to
# summation order; fp16/bf16 round the dequantized weight once (2^-11 / 2^-8 relative)
# and the output once. test_tolerances_catch_bugs shows a real bug is far above these.
TOL = KERNEL_REL_ERR


def make_layer(n, k, g, offset, bias, **kw):
    return packed_case.make_layer(n, k, g, offset, bias, DEVICE, **kw)


def make_x(m, k, dtype, seed=1):
    return packed_case.make_x(m, k, dtype, DEVICE, seed)


# (N, K, g): K a multiple of g; K not a multiple of g (padded last group, 200 = 3*64 + 8);
# g = 8 (every byte its own group); g = 24 and 200 (not powers of 2: tiles straddle groups);
# odd N everywhere so the row masks matter.
SHAPES = [(37, 200, 64), (37, 72, 8), (40, 256, 128), (33, 96, 32), (19, 200, 24), (21, 400, 200)]


@pytest.mark.parametrize("m", [1, 3, 17, 64])  # 1, 3: GEMV path; 17, 64: GEMM path
@pytest.mark.parametrize("n,k,g", SHAPES)
@pytest.mark.parametrize("offset,bias", [(False, False), (True, True), (True, False)])
def test_parity_fp32(n, k, g, m, offset, bias):
    layer = make_layer(n, k, g, offset, bias)
    x = make_x(m, k, torch.float32)
    check(_triton.dbgemm_triton(x, *layer, k, g), x, layer, k, g)


@pytest.mark.parametrize("planes", [1, 3, 4])
@pytest.mark.parametrize("m", [1, 17])  # GEMV and GEMM paths
@pytest.mark.parametrize("n,k,g", [(37, 200, 64), (19, 200, 24), (33, 96, 32)])
def test_parity_any_plane_count(n, k, g, m, planes):
    """k = 1, 3, 4 bit planes (format v2) on odd shapes, offset and bias on and off."""
    for offset, bias in ((False, False), (True, True)):
        layer = make_layer(n, k, g, offset, bias, seed=planes, planes=planes)
        x = make_x(m, k, torch.float32)
        check(_triton.dbgemm_triton(x, *layer, k, g), x, layer, k, g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("n,k,g", [(37, 200, 64), (37, 72, 8), (19, 200, 24)])
def test_parity_half(n, k, g, m, dtype):
    layer = make_layer(n, k, g, offset=True, bias=True)
    x = make_x(m, k, dtype)
    check(_triton.dbgemm_triton(x, *layer, k, g), x, layer, k, g)


# Fixed configurations that reach both scale-loading branches of each kernel: K tiles
# inside one group (BLOCK_K divides g) and K tiles spanning groups (one scale per element
# or per byte), plus split-K slices that end mid-group and slices left empty.
@pytest.mark.parametrize("config", [
    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2},   # 4 tiles per group of 64
    {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1},  # 2 groups per tile
    {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4},
])
def test_gemm_configs(config):
    n, k, g = 37, 200, 64
    layer = make_layer(n, k, g, offset=True, bias=True)
    for m in (1, 17, 40):
        x = make_x(m, k, torch.float32)
        check(_triton.gemm(x, *layer, k, g, config=config), x, layer, k, g)


@pytest.mark.parametrize("split_k", [1, 2, 3, 8])
@pytest.mark.parametrize("config", [{"BLOCK_N": 16, "BLOCK_K": 32}, {"BLOCK_N": 64, "BLOCK_K": 128}])
def test_gemv_split_k(split_k, config):
    n, k, g = 37, 200, 64
    layer = make_layer(n, k, g, offset=True, bias=True)
    x = make_x(2, k, torch.float32)
    check(_triton.gemv(x, *layer, k, g, split_k=split_k, config=config), x, layer, k, g)


def test_gemv_and_gemm_agree_at_any_m():
    """Both kernels are exact enough to stand in for each other at any M (the dispatch
    threshold is a speed choice, not a correctness one)."""
    n, k, g = 29, 136, 8
    layer = make_layer(n, k, g, offset=True, bias=False)
    for m in (1, 5, 17):
        x = make_x(m, k, torch.float32)
        y1, y2 = _triton.gemv(x, *layer, k, g), _triton.gemm(x, *layer, k, g)
        check(y1, x, layer, k, g)
        check(y2, x, layer, k, g)
        assert rel_err(y1, y2) < 1e-5


def test_padding_bits_are_ignored():
    """Bits set in the padded channels K..Kp-1 (a carelessly written file) change nothing."""
    n, k, g = 37, 200, 64
    clean = make_layer(n, k, g, offset=True, bias=False, seed=3)
    dirty = make_layer(n, k, g, offset=True, bias=False, seed=3, pad_garbage=True)
    assert not torch.equal(clean[0], dirty[0])
    for m in (1, 17):
        x = make_x(m, k, torch.float32)
        check(_triton.dbgemm_triton(x, *dirty, k, g), x, clean, k, g)


def test_tolerances_catch_bugs():
    """A wrong bit order, a wrong group index or a dropped offset is far above TOL, so the
    parity tests would fail on such a kernel bug."""
    n, k, g = 37, 200, 64
    layer = make_layer(n, k, g, offset=True, bias=False)
    x = make_x(17, k, torch.float16)
    assert_bugs_are_caught(_triton.dbgemm_triton(x, *layer, k, g), x, layer, k, g)


def test_registry_resolves_triton():
    kernel = registry.get("dbgemm", "triton", DEVICE)
    assert kernel is _triton.dbgemm_triton
    assert registry.resolve("auto", "cpu") != "triton"  # the CPU preference is unchanged
    n, k, g = 37, 72, 8
    layer = make_layer(n, k, g, offset=False, bias=True)
    x = torch.randn(2, 3, k).to(DEVICE)  # leading dims are flattened and restored
    y = kernel(x, *layer, k, g)
    assert y.shape == (2, 3, n)
    check(y.reshape(6, n), x.reshape(6, k), layer, k, g)
    xt = torch.randn(k, 5).to(DEVICE).T  # a strided (transposed) x works as is
    check(kernel(xt, *layer, k, g), xt, layer, k, g)


def test_packed_linear_on_triton():
    n, k, g = 24, 80, 16
    qweight, scales, off, b = make_layer(n, k, g, offset=True, bias=True)
    mod = PackedLinear(k, n, g, bias=True, offset=True, backend="triton").to(DEVICE)
    for name, t in (("qweight", qweight), ("scales", scales), ("offset", off)):
        getattr(mod, name).copy_(t)
    mod.bias.data.copy_(b)
    x = make_x(5, k, torch.float32)
    check(mod(x), x, (qweight, scales, off, b), k, g)


def test_input_validation():
    n, k, g = 37, 200, 64
    qweight, scales, off, b = make_layer(n, k, g, offset=True, bias=True)
    x = make_x(3, k, torch.float32)
    run = _triton.dbgemm_triton
    with pytest.raises(ValueError, match=r"x must be float16, bfloat16 or float32, got torch.int32"):
        run(x.int(), qweight, scales, off, b, k, g)
    with pytest.raises(ValueError, match=r"x has shape \(3, 199\) but in_features=200"):
        run(x[:, :199], qweight, scales, off, b, k, g)
    with pytest.raises(ValueError, match=r"group_size must be a positive multiple of 8, got 12"):
        run(x, qweight, scales, off, b, k, 12)
    with pytest.raises(ValueError,
                       match=r"qweight must be uint8 \[k, N, 32\] \(k in 1..4\).*got torch.uint8 \(2, 37, 31\)"):
        run(x, qweight[..., :31], scales, off, b, k, g)
    with pytest.raises(ValueError,
                       match=r"qweight must be uint8 \[k, N, 32\] \(k in 1..4\).*got torch.uint8 \(5, 37, 32\)"):
        run(x, qweight[[0, 1, 0, 1, 0]], scales, off, b, k, g)  # five planes: more than the format holds
    with pytest.raises(ValueError, match=r"scales must have shape \(37, 4, 3\) .*got \(37, 4, 2\)"):
        run(x, qweight[[0, 1, 0]], scales, off, b, k, g)  # three planes, two scales per group
    with pytest.raises(ValueError, match=r"qweight must be uint8 .* got torch.int16"):
        run(x, qweight.short(), scales, off, b, k, g)
    with pytest.raises(ValueError, match=r"scales must have shape \(37, 4, 2\) .*got \(37, 3, 2\)"):
        run(x, qweight, scales[:, :3], off, b, k, g)
    with pytest.raises(ValueError, match=r"offset must have shape \(37, 4\)"):
        run(x, qweight, scales, off[:, :2], b, k, g)
    with pytest.raises(ValueError, match=r"bias must have shape \(37,\)"):
        run(x, qweight, scales, off, b[:5], k, g)
    with pytest.raises(ValueError, match=r"scales must be contiguous \(shape \(37, 4, 2\), strides"):
        run(x, qweight, scales.transpose(0, 1).contiguous().transpose(0, 1), off, b, k, g)
    with pytest.raises(ValueError, match=r"scales must be a float16/bfloat16/float32 tensor, got torch.int16"):
        run(x, qweight, scales.short(), off, b, k, g)
    if DEVICE == "cpu":
        meta = torch.empty(n, dtype=torch.float32, device="meta")
        with pytest.raises(ValueError, match=r"bias is on meta but x is on cpu"):
            run(x, qweight, scales, off, meta, k, g)


def test_empty_input():
    n, k, g = 37, 72, 8
    layer = make_layer(n, k, g, offset=False, bias=False)
    y = _triton.dbgemm_triton(torch.empty(0, k, device=DEVICE), *layer, k, g)
    assert y.shape == (0, n)
