"""Packed format: exact round trips, the golden vector of docs/FORMAT.md, bit accounting, bad input."""

import pytest
import torch

from dbquant.errors import DbquantError
from dbquant.format import layout
from dbquant.format.layout import LinearLayout

# The worked example of docs/FORMAT.md: N=2, K=10, g=8 -> Kp=16, G=2.
GOLDEN_B1 = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]], dtype=torch.uint8)
GOLDEN_B2 = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 0, 1]], dtype=torch.uint8)
GOLDEN_ALPHA = torch.tensor([[[0.5, -0.25], [1.0, 0.125]], [[2.0, -1.0], [0.5, 0.5]]])
GOLDEN_QWEIGHT = [[[0x8D, 0x02], [0x00, 0x03]], [[0x26, 0x03], [0xFF, 0x02]]]
GOLDEN_SCALE_BITS = [[[0x3800, 0xB400], [0x3C00, 0x3000]], [[0x4000, 0xBC00], [0x3800, 0x3800]]]
GOLDEN_W = [[0.5, -0.25, 0.25, 0.5, 0.0, -0.25, 0.0, 0.5, 0.125, 1.125],
            [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 0.5, 1.0]]


def _pad(b, kp):
    out = torch.zeros(b.shape[0], kp, dtype=torch.uint8)
    out[:, : b.shape[1]] = b
    return out


def _bits16(t):
    return t.view(torch.int16).to(torch.int32).bitwise_and(0xFFFF).tolist()


def test_golden_vector():
    """Format version 1's example (k = 2); a version-2 file with k = 2 holds the same bytes."""
    lay = LinearLayout(2, 10, 8)
    packed = layout.pack(torch.stack([_pad(GOLDEN_B1, 16), _pad(GOLDEN_B2, 16)]), GOLDEN_ALPHA, None, lay)
    assert packed["qweight"].tolist() == GOLDEN_QWEIGHT
    assert _bits16(packed["scales"]) == GOLDEN_SCALE_BITS
    planes, alpha, offset = layout.unpack(packed, lay)
    w = layout.dequantize(planes, alpha, offset, 10)
    assert w.tolist() == GOLDEN_W
    assert lay.storage_bits() == 2 * 2 * 16 + 2 * 2 * 2 * 16
    assert lay.bits_per_weight() == pytest.approx(192 / 20)


@pytest.mark.parametrize("kk", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k,g,offset", [(1, 8, 8, False), (3, 13, 8, True), (7, 100, 64, False),
                                          (5, 576, 64, True), (2, 577, 128, False), (33, 1000, 24, True)])
def test_pack_unpack_exact(n, k, g, offset, kk):
    gen = torch.Generator().manual_seed(n * 1000 + k + kk)
    lay = LinearLayout(n, k, g, offset, kk)
    kp, groups = lay.padded_in_features, lay.groups
    planes = torch.randint(0, 2, (kk, n, kp), generator=gen, dtype=torch.uint8)
    planes[:, :, k:] = 0
    alpha = torch.randn(n, groups, kk, generator=gen).half().float()
    beta = torch.randn(n, groups, generator=gen).half().float() if offset else None
    packed = layout.pack(planes, alpha, beta, lay)
    for name, (shape, dtype) in lay.tensor_specs().items():
        assert tuple(packed[name].shape) == shape and packed[name].dtype == dtype
    up, ua, ub = layout.unpack(packed, lay)
    assert torch.equal(up, planes) and torch.equal(ua, alpha)
    assert (ub is None) == (beta is None) and (beta is None or torch.equal(ub, beta))


# Format version 2's example: the version-1 example with a third plane (k = 3).
GOLDEN_B3 = torch.tensor([[1, 1, 0, 0, 0, 0, 1, 1, 0, 1], [0, 1, 0, 1, 0, 1, 0, 1, 1, 0]], dtype=torch.uint8)
GOLDEN_ALPHA3 = torch.tensor([[[0.5, -0.25, 0.0625], [1.0, 0.125, -0.5]], [[2.0, -1.0, 0.25], [0.5, 0.5, 1.0]]])
GOLDEN_QWEIGHT3 = GOLDEN_QWEIGHT + [[[0xC3, 0x02], [0xAA, 0x01]]]
GOLDEN_SCALE_BITS3 = [[[0x3800, 0xB400, 0x2C00], [0x3C00, 0x3000, 0xB800]],
                      [[0x4000, 0xBC00, 0x3400], [0x3800, 0x3800, 0x3C00]]]
GOLDEN_W3 = [[0.5625, -0.1875, 0.25, 0.5, 0.0, -0.25, 0.0625, 0.5625, 0.125, 0.625],
             [-1.0, -0.75, -1.0, -0.75, -1.0, -0.75, -1.0, -0.75, 1.5, 1.0]]


def test_golden_vector_v2_three_planes():
    lay = LinearLayout(2, 10, 8, planes=3)
    planes = torch.stack([_pad(b, 16) for b in (GOLDEN_B1, GOLDEN_B2, GOLDEN_B3)])
    packed = layout.pack(planes, GOLDEN_ALPHA3, None, lay)
    assert packed["qweight"].tolist() == GOLDEN_QWEIGHT3
    assert _bits16(packed["scales"]) == GOLDEN_SCALE_BITS3
    up, alpha, offset = layout.unpack(packed, lay)
    assert layout.dequantize(up, alpha, offset, 10).tolist() == GOLDEN_W3
    assert lay.storage_bits() == 3 * 2 * 16 + 2 * 2 * 3 * 16


def test_versions():
    assert layout.FORMAT_VERSION == 2 and layout.SUPPORTED_VERSIONS == (1, 2)
    assert layout.check_version(1) == 1 and layout.check_version("2") == 2


def test_pack_bits_order_and_inverse():
    bits = torch.zeros(1, 16, dtype=torch.uint8)
    bits[0, 0] = 1   # LSB of byte 0
    bits[0, 15] = 1  # MSB of byte 1
    assert layout.pack_bits(bits).tolist() == [[0x01, 0x80]]
    allbytes = torch.arange(256, dtype=torch.uint8).view(4, 64)
    assert torch.equal(layout.pack_bits(layout.unpack_bits(allbytes)), allbytes)


def test_bpw_accounting():
    assert LinearLayout(1536, 576, 64).bits_per_weight() == 2.5
    assert LinearLayout(1536, 576, 64, offset=True).bits_per_weight() == 2.75
    # 576 is not a multiple of 128: the padding is paid for
    assert LinearLayout(10, 576, 128).bits_per_weight() == pytest.approx((2 * 640 + 5 * 32) / 576)
    # k planes: k bits + 16 k bits per group (+ 16 with an offset)
    assert LinearLayout(1536, 576, 64, planes=1).bits_per_weight() == 1.25
    assert LinearLayout(1536, 576, 64, offset=True, planes=1).bits_per_weight() == 1.5
    assert LinearLayout(1536, 576, 64, planes=3).bits_per_weight() == 3.75
    assert LinearLayout(1536, 576, 128, planes=4).bits_per_weight() == pytest.approx((4 * 640 + 5 * 64) / 576)


@pytest.mark.parametrize("g", [0, 4, 12, 65, 8192, 64.0, "64"])
def test_bad_group_size(g):
    with pytest.raises(DbquantError, match="group size"):
        layout.check_group_size(g)


@pytest.mark.parametrize("v", [0, 3, "x", None])  # 1 and 2 are read (2: k planes, tables)
def test_bad_version(v):
    with pytest.raises(DbquantError, match="format version"):
        layout.check_version(v)


def test_check_tensors_names_the_problem():
    lay = LinearLayout(4, 16, 8)
    good = layout.pack(torch.zeros(2, 4, 16, dtype=torch.uint8), torch.ones(4, 2, 2), None, lay)
    with pytest.raises(DbquantError, match="scales is missing"):
        layout.check_tensors({"qweight": good["qweight"]}, lay)
    with pytest.raises(DbquantError, match=r"qweight has shape \(2, 4, 1\)"):
        layout.check_tensors({**good, "qweight": good["qweight"][..., :1]}, lay)
    with pytest.raises(DbquantError, match="torch.float32"):
        layout.check_tensors({**good, "scales": good["scales"].float()}, lay)
