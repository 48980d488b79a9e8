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
    assert layout.FORMAT_VERSION == 3 and layout.SUPPORTED_VERSIONS == (1, 2, 3)
    assert layout.check_version(1) == 1 and layout.check_version("2") == 2 and layout.check_version(3) == 3


# Format version 3's example: the version-1 example with 8-bit scales. Row maxima m = 1.0 and 2.0;
# codes round(alpha * 127 / m) (63.5 and -63.5 round to even: 64, -64); decoded float16(code * m / 127).
GOLDEN_CODES8 = [[[64, -32], [127, 16]], [[127, -64], [32, 32]]]
GOLDEN_MAX8_BITS = [0x3C00, 0x4000]  # float16 1.0, 2.0
GOLDEN_ALPHA8 = [[[0.50390625, -0.251953125], [1.0, 0.1259765625]], [[2.0, -1.0078125], [0.50390625, 0.50390625]]]
GOLDEN_W8 = [[0.50390625, -0.251953125, 0.251953125, 0.50390625, 0.0, -0.251953125, 0.0, 0.50390625, 0.1259765625,
              1.1259765625], [-1.0078125] * 8 + [0.50390625, 1.0078125]]


def test_golden_vector_v3_eight_bit_scales():
    lay = LinearLayout(2, 10, 8, scale_bits=8)
    assert lay.tensor_specs()["scales"] == ((2, 2, 2), torch.int8)
    assert lay.tensor_specs()["scale_max"] == ((2,), torch.float16)
    packed = layout.pack(torch.stack([_pad(GOLDEN_B1, 16), _pad(GOLDEN_B2, 16)]), GOLDEN_ALPHA, None, lay)
    assert packed["qweight"].tolist() == GOLDEN_QWEIGHT  # the planes are version 1's bytes
    assert packed["scales"].tolist() == GOLDEN_CODES8
    assert _bits16(packed["scale_max"]) == GOLDEN_MAX8_BITS
    planes, alpha, offset = layout.unpack(packed, lay)
    assert alpha.tolist() == GOLDEN_ALPHA8
    assert layout.dequantize(planes, alpha, offset, 10).tolist() == GOLDEN_W8
    # 2 planes x 2 rows x 16 bits + 2 rows x 2 groups x 2 codes x 8 + 2 row maxima x 16
    assert lay.storage_bits() == 64 + 64 + 32


@pytest.mark.parametrize("kk", [1, 2, 4])
@pytest.mark.parametrize("n,k,g,offset", [(1, 8, 8, False), (3, 13, 8, True), (5, 576, 64, True),
                                          (33, 1000, 24, False)])
def test_pack_unpack_exact_eight_bit(n, k, g, offset, kk):
    """Scales on the 8-bit grid (decoded codes) survive pack -> unpack -> pack bit for bit."""
    gen = torch.Generator().manual_seed(n * 1000 + k + kk)
    lay = LinearLayout(n, k, g, offset, kk, scale_bits=8)
    planes = torch.randint(0, 2, (kk, n, lay.padded_in_features), generator=gen, dtype=torch.uint8)
    planes[:, :, k:] = 0
    codes = torch.randint(-127, 128, (n, lay.groups, kk), generator=gen, dtype=torch.int8)
    codes[:, 0, 0] = 127  # the row maximum is a code of +-127, as quantize_scales makes it
    alpha = layout.float_scales(codes, torch.rand(n, generator=gen).add(0.01).half()).float()
    beta = torch.randn(n, lay.groups, generator=gen).half().float() if offset else None
    packed = layout.pack(planes, alpha, beta, lay)
    for name, (shape, dtype) in lay.tensor_specs().items():
        assert tuple(packed[name].shape) == shape and packed[name].dtype == dtype
    assert torch.equal(packed["scales"], codes)
    up, ua, ub = layout.unpack(packed, lay)
    assert torch.equal(up, planes) and torch.equal(ua, alpha)
    assert (ub is None) == (beta is None) and (beta is None or torch.equal(ub, beta))
    again = layout.pack(up, ua, ub, lay)
    assert all(torch.equal(again[name], packed[name]) for name in packed)


@pytest.mark.parametrize("magnitude", [1e-3, 1e-2, 1.0, 300.0])
def test_eight_bit_scales_round_trip_and_error(magnitude):
    """Any float scales: their 8-bit storage is a fixed point (re-quantizing the decoded scales gives the
    same codes and maxima), the largest code of a row is +-127, and the error is below half a code step
    plus float16 rounding. Rows are kept in float16's normal range (its subnormals lose the codes' precision)."""
    gen = torch.Generator().manual_seed(int(magnitude * 1000))
    alpha = torch.randn(500, 9, 3, generator=gen) * magnitude * (0.1 + torch.rand(500, 1, 1, generator=gen))
    codes, m = layout.quantize_scales(alpha)
    dec = layout.float_scales(codes, m)
    assert dec.dtype == torch.float16
    assert torch.equal(codes.abs().amax(dim=(1, 2)), torch.full((500,), 127, dtype=torch.int8))
    c2, m2 = layout.quantize_scales(dec.float())
    assert torch.equal(c2, codes) and torch.equal(m2, m)
    step = m.float()[:, None, None] / 127
    bound = step / 2 + alpha.abs() * 2.0 ** -10 + m.float()[:, None, None] * 2.0 ** -11
    assert ((dec.float() - alpha).abs() <= bound).all()
    assert torch.equal(layout.storable_scales(alpha, 8), dec.float())


def test_eight_bit_scales_of_a_zero_row():
    codes, m = layout.quantize_scales(torch.zeros(2, 3, 2))
    assert not codes.any() and not m.any() and not layout.float_scales(codes, m).any()


@pytest.mark.parametrize("bits", [4, 12, 32, True, "8"])
def test_bad_scale_bits(bits):
    with pytest.raises(DbquantError, match="scale width"):
        layout.check_scale_bits(bits)


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
    # 8-bit scales: k bits + 8 k bits per group + one float16 maximum per row
    assert LinearLayout(1536, 576, 64, scale_bits=8).bits_per_weight() == pytest.approx(2.25 + 16 / 576)
    assert LinearLayout(1536, 1536, 64, scale_bits=8).bits_per_weight() == pytest.approx(2.25 + 16 / 1536)
    assert LinearLayout(8, 576, 32, offset=True, planes=1, scale_bits=8).bits_per_weight() == pytest.approx(
        1 + 8 / 32 + 16 / 32 + 16 / 576)  # the offset stays float16


@pytest.mark.parametrize("g", [0, 4, 12, 65, 8192, 64.0, "64"])
def test_bad_group_size(g):
    with pytest.raises(DbquantError, match="group size"):
        layout.check_group_size(g)


@pytest.mark.parametrize("v", [0, 4, "x", None])  # 1, 2 and 3 are read (2: k planes, tables; 3: 8-bit scales)
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
