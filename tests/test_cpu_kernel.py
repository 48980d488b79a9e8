"""Parity of the C++ CPU kernel (torch.ops.dbquant.dbgemm_cpu) with the reference, on every
ISA path this CPU supports, and of the ISA paths with each other.

These are the float tables' tests (dbgemm_t16.h), so the calls that pin its exactness force
``lut="float"``: at M = 1 ``lut="auto"`` may pick the integer tables (dbgemm_i8lut.h), which are
not bit-identical and have tests of their own against their stated bound (test_cpu_i8lut.py).

Needs the extension ``dbquant._C``: built by ``pip install --no-build-isolation -e .``.
Without it these tests skip, or FAIL when DBQUANT_REQUIRE_NATIVE=1 (CI sets it).
"""

from __future__ import annotations

import itertools
import os
import warnings

import pytest
import torch

from dbquant.backends import cpu as cpu_backend
from dbquant.backends import t16
from dbquant.backends.checks import KernelInputError
from dbquant.backends.reference import dbgemm_ref, dequantize_ref, gemm_a8_ref, i8lut_error_bound, quantize_a8_ref
from tests.tolerances import FP32_REORDER_LONG

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the skip/fail reason below says it instead
    HAVE_NATIVE = cpu_backend.load_cpu()


@pytest.fixture(autouse=True)
def _need_native():
    if HAVE_NATIVE:
        return
    reason = (f"dbquant._C (C++ CPU kernel) is not importable ({cpu_backend._cpu_error}); build it "
              f"with `{cpu_backend.BUILD_HINT}`")
    if os.environ.get("DBQUANT_REQUIRE_NATIVE") == "1":
        pytest.fail(f"DBQUANT_REQUIRE_NATIVE=1 but {reason}")
    pytest.skip(reason)


def pack_planes(bits: torch.Tensor) -> torch.Tensor:
    """{0,1} [2, N, Kp] -> uint8 [2, N, Kp/8], bit j of byte i = channel 8*i + j (LSB first).

    Written out here rather than borrowed from dbquant.format.layout so the kernel's bit order
    is pinned independently of the library's own packer.
    """
    p, n, kp = bits.shape
    weights = (1 << torch.arange(8, dtype=torch.int32))
    return (bits.reshape(p, n, kp // 8, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def make_layer(n, k, g, offset, bias, seed=0, pad_garbage=False, planes=2):
    """Random packed linear of ``planes`` bit planes: (qweight, scales, offset, bias) with canonical shapes."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // g)
    kp = groups * g
    bits = torch.randint(0, 2, (planes, n, kp), generator=gen)
    if not pad_garbage:
        bits[..., k:] = 0  # the format: padded channels hold 0
    qweight = pack_planes(bits)
    scales = torch.randn(n, groups, planes, generator=gen)
    off = torch.randn(n, groups, generator=gen) if offset else None
    b = torch.randn(n, generator=gen) if bias else None
    return qweight, scales, off, b


ISAS = torch.ops.dbquant.cpu_isas() if HAVE_NATIVE else []


def prepared(n, k, g, offset, bias, seed=0, pad_garbage=False, planes=2):
    """(CpuWeight, bias, canonical tensors) of a random layer with float16 scales (the format's)."""
    qweight, scales, off, b = make_layer(n, k, g, offset, bias, seed, pad_garbage, planes)
    scales = scales.half()
    off = None if off is None else off.half()
    return cpu_backend.prepare_cpu(qweight, scales, off, k, g), b, (qweight, scales, off)


def assert_matches(y, ref):
    scale = ref.abs().max().clamp_min(1.0).item()
    torch.testing.assert_close(y, ref, rtol=FP32_REORDER_LONG, atol=FP32_REORDER_LONG * scale)


@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("g", [8, 32, 64, 128])
@pytest.mark.parametrize("k", [8, 24, 100, 576, 1000])
def test_parity_shapes_all_isas(k, g, m):
    """Every ISA path matches the reference; scalar and AVX-512 agree bit for bit (the same float
    operations in the same order, lane by lane: csrc/cpu/dbgemm_t16.h). AVX2 tabulates 2-channel
    chunks (csrc/cpu/dbgemm_t16_avx2.cpp), so it adds the same products in another order."""
    assert "scalar" in ISAS
    for n, offset, bias in itertools.product([1, 7, 33], [False, True], [False, True]):
        w, b, canon = prepared(n, k, g, offset, bias, seed=k * 7 + g + n)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k))
        ref = dbgemm_ref(x, *canon[:2], canon[2], b, k, g)
        ys = {isa: cpu_backend.run_cpu(x, w, b, isa, lut="float") for isa in ISAS}
        for isa, y in ys.items():
            assert y.shape == (m, n) and y.dtype == torch.float32, isa
            assert_matches(y, ref)
            if isa != "avx2":
                assert torch.equal(y, ys["scalar"]), f"{isa} differs from scalar"


@pytest.mark.parametrize("planes", [1, 3, 4])
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("k,g", [(24, 8), (100, 32), (200, 64), (576, 128)])
def test_parity_any_plane_count(k, g, m, planes):
    """k = 1, 3, 4 planes (one table pass per plane) on odd shapes: every ISA path matches the
    reference, scalar and AVX-512 bit for bit; the dense dequantization equals the reference's."""
    for n, offset, bias in itertools.product([1, 7, 33], [False, True], [False, True]):
        w, b, canon = prepared(n, k, g, offset, bias, seed=k + g + n + planes, planes=planes)
        assert w.planes.shape[2] == planes and w.planes_count == planes
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k + planes))
        ref = dbgemm_ref(x, *canon[:2], canon[2], b, k, g)
        ys = {isa: cpu_backend.run_cpu(x, w, b, isa, lut="float") for isa in ISAS}
        for isa, y in ys.items():
            assert y.shape == (m, n)
            assert_matches(y, ref)
            if isa != "avx2":
                assert torch.equal(y, ys["scalar"]), f"{isa} differs from scalar at k={planes}"
        assert torch.equal(cpu_backend.dequantize_cpu(w), dequantize_ref(*canon, k))


@pytest.mark.parametrize("planes", [1, 3])
def test_widen_keeps_the_weight(planes):
    """t16.widen (how the decoder fuses parts of unequal k and g): zero planes, split groups,
    a zero offset; the dense weight is unchanged and the kernel output agrees to rounding."""
    from dbquant.backends.t16 import canonical, widen
    w, _, canon = prepared(33, 200, 64, False, False, seed=3, planes=planes)
    wide = widen(w, 4, 32, offset=True)
    assert wide.planes_count == 4 and wide.group_size == 32 and wide.offset is not None
    q, s, o = canonical(wide)
    assert torch.equal(dequantize_ref(q, s, o, 200), dequantize_ref(*canon, 200))
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(9))
    assert_matches(cpu_backend.run_cpu(x, wide, None), dbgemm_ref(x, *canon, None, 200, 64))


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_simd_path_available_or_reported(isa):
    """The SIMD paths run where the CPU has them; elsewhere the op names the reason."""
    if isa in ISAS:
        w, b, canon = prepared(16, 64, 64, True, True)
        x = torch.randn(1, 64)
        y = cpu_backend.run_cpu(x, w, b, isa, lut="float")
        assert y.shape == (1, 16)
        assert_matches(y, dbgemm_ref(x, *canon, b, 64, 64))
    else:
        w, b, _ = prepared(16, 64, 64, False, False)
        with pytest.raises(RuntimeError, match=f"isa='{isa}' is not supported by this CPU"):
            cpu_backend.run_cpu(torch.randn(1, 64), w, b, isa)


def test_unknown_isa():
    w, b, _ = prepared(16, 64, 64, False, False)
    with pytest.raises(RuntimeError, match="unknown isa 'sse9'; use auto, avx512, avx2 or scalar"):
        cpu_backend.run_cpu(torch.randn(1, 64), w, b, "sse9")
    with pytest.raises(RuntimeError, match="unknown isa 'sse9'"), cpu_backend.forced_isa("sse9"):
        pass


def test_forced_isa_runs_that_path_and_restores_auto():
    """forced_isa makes "auto" run the named path (bit for bit its explicit result) and gives the
    previous setting back on exit; a path this CPU lacks is refused."""
    w, b, _ = prepared(33, 200, 64, True, True)
    x = torch.randn(1, 200, generator=torch.Generator().manual_seed(4))
    for isa in ISAS:
        with cpu_backend.forced_isa(isa):
            assert torch.equal(cpu_backend.run_cpu(x, w, b, "auto", lut="float"),
                               cpu_backend.run_cpu(x, w, b, isa, lut="float"))
            assert torch.ops.dbquant.cpu_force_isa(isa) == isa  # the setting in force, put back unchanged
    assert torch.ops.dbquant.cpu_force_isa("auto") == "auto"
    for isa in {"avx512", "avx2"} - set(ISAS):
        with pytest.raises(RuntimeError, match=f"isa='{isa}' is not supported by this CPU"):
            torch.ops.dbquant.cpu_force_isa(isa)


def test_t16_layout_golden():
    """The repack regroups whole bytes: planes[t, c, p, r] = qweight[p, 16t + r, c], etc."""
    n, k, g = 21, 100, 32  # 2 tiles (the second has 5 real rows), Kp = 128, C8 = 16, G = 4
    w, _, (qweight, scales, off) = prepared(n, k, g, True, False)
    w = t16.with_cols(w, 1)  # the unit order (dword rows: tests/test_dword_rows.py)
    assert w.planes.shape == (2, 16, 2, 16) and w.planes.dtype == torch.uint8
    assert w.scales.shape == (2, 4, 2, 16) and w.scales.dtype == torch.float16
    assert w.offset.shape == (2, 4, 16)
    for t, c, p, r in [(0, 0, 0, 0), (0, 15, 1, 15), (1, 3, 0, 4), (1, 7, 1, 2)]:
        assert w.planes[t, c, p, r] == qweight[p, 16 * t + r, c]
        assert w.scales[t, c % 4, p, r] == scales[16 * t + r, c % 4, p]
        assert w.offset[t, c % 4, r] == off[16 * t + r, c % 4]
    assert not w.planes[1, :, :, 5:].any() and not w.scales[1, :, :, 5:].any()  # padding rows: zero
    assert w.nbytes == 2 * 16 * 2 * 16 + 2 * (2 * 4 * 2 * 16 + 2 * 4 * 16)


@pytest.mark.parametrize("lead", [(), (3,), (2, 3), (1, 1, 1)])
def test_wrapper_leading_dims(lead):
    n, k, g = 19, 100, 32
    qweight, scales, off, b = make_layer(n, k, g, True, True)
    x = torch.randn(*lead, k)
    y = cpu_backend.dbgemm_cpu(x, qweight, scales.half(), off.half(), b, k, g)
    assert y.shape == (*lead, n)
    ref = dbgemm_ref(x, qweight, scales.half(), off.half(), b, k, g)
    kind = cpu_backend.default_lut()
    if x.numel() == k and kind != "float":
        # one row: the registry entry takes lut="auto", i.e. the integer tables here; their bound
        bound = i8lut_error_bound(x.reshape(1, k), scales.half(), k, g, kind).reshape(ref.shape)
        assert ((y - ref).abs() <= bound + FP32_REORDER_LONG * ref.abs().max().clamp_min(1.0)).all()
    else:
        assert_matches(y, ref)


def test_wrapper_noncontiguous_x_and_float16_inputs():
    n, k, g = 40, 96, 32
    qweight, scales, off, b = make_layer(n, k, g, True, True)
    x = torch.randn(k, 6).t()  # [6, K], non-contiguous
    assert not x.is_contiguous()
    ref = dbgemm_ref(x, qweight, scales.half(), off.half(), b.half(), k, g)
    y = cpu_backend.dbgemm_cpu(x, qweight, scales.half(), off.half(), b.half(), k, g)
    assert_matches(y, ref)
    # A non-float32 x is computed in float32 and returned in its dtype (the reference's contract).
    yb = cpu_backend.dbgemm_cpu(x.bfloat16(), qweight, scales.half(), off.half(), b, k, g)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb, dbgemm_ref(x.bfloat16(), qweight, scales.half(), off.half(), b, k, g))


def test_packed_linear_prepares_once_and_sees_updates():
    from dbquant.model.modules import PackedLinear

    n, k, g = 24, 64, 64
    qweight, scales, _, _ = make_layer(n, k, g, False, False)
    mod = PackedLinear(k, n, g, backend="cpu")
    mod.qweight.copy_(qweight)
    mod.scales.copy_(scales.half())
    x = torch.randn(2, k)
    y1 = mod(x)
    first = mod._prepared_cache[1]
    mod(x)
    assert mod._prepared_cache[1] is first  # reused, not rebuilt per call
    mod.scales.mul_(2)  # bumps the version counter: the prepared copy must be rebuilt
    y2 = mod(x)
    assert mod._prepared_cache[1] is not first
    assert_matches(y2, 2 * y1)
    assert "_prepared_cache" not in str(mod.state_dict().keys())


def test_padding_bits_are_ignored():
    # Channels >= K count as zero activations, so stray bits in the padding change nothing.
    n, k, g = 9, 100, 64
    clean, _, canon = prepared(n, k, g, True, False, seed=3)
    dirty, _, canon_dirty = prepared(n, k, g, True, False, seed=3, pad_garbage=True)
    assert not torch.equal(canon[0], canon_dirty[0])
    x = torch.randn(4, k)
    for isa in ISAS:
        for lut in ("float", "int8"):
            assert torch.equal(cpu_backend.run_cpu(x, dirty, None, isa, lut=lut),
                               cpu_backend.run_cpu(x, clean, None, isa, lut=lut))


def test_many_rows_uses_several_table_slices():
    # K=1000 needs 64 KiB of tables per row: M=300 exceeds the 16 MiB cap, so rows are sliced.
    n, k, g = 17, 1000, 128
    w, b, canon = prepared(n, k, g, True, True)
    x = torch.randn(300, k)
    assert_matches(cpu_backend.run_cpu(x, w, b, ISAS[0]), dbgemm_ref(x, *canon, b, k, g))


@pytest.mark.parametrize("n,k,g,offset", [(37, 200, 64, True), (1536, 576, 64, False), (5, 24, 8, True)])
def test_dequantize_equals_reference(n, k, g, offset):
    w, _, canon = prepared(n, k, g, offset, False, pad_garbage=True)
    dense = cpu_backend.dequantize_cpu(w)
    assert dense.shape == (n, k) and dense.dtype == torch.float32
    assert torch.equal(dense, dequantize_ref(*canon, k))


@pytest.mark.parametrize("planes", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k,g,offset", [(37, 200, 64, True), (1536, 576, 64, False), (5, 24, 8, True),
                                          (16, 40, 8, False)])
def test_transposed_dequantize_equals_reference(n, k, g, offset, planes):
    """dequantize_t_cpu: every ISA path gives the reference's weight transposed, bit for bit in float32,
    and torch's own float32 -> bfloat16 rounding of it in bf16 (odd shapes: partial tiles, K not a
    multiple of 8 or of the group, garbage in the padding)."""
    w, _, canon = prepared(n, k, g, offset, False, pad_garbage=True, planes=planes)
    want = dequantize_ref(*canon, k).t()
    for isa in ISAS:
        for bf16 in (False, True):
            wt = torch.ops.dbquant.dequantize_t_cpu(w.planes, w.scales, w.offset, n, k, g, bf16, isa)
            assert wt.shape == (k, n) and wt.dtype == (torch.bfloat16 if bf16 else torch.float32)
            assert torch.equal(wt, want.to(wt.dtype)), (isa, bf16)


def test_bf16_gemm_is_close_and_fp32_exact():
    """dense_gemm: fp32 is F.linear on the dequantized weight bit for bit; bf16 (weights and activations
    rounded, a bf16 result) stays within bf16 rounding of it."""
    n, k, g = 96, 200, 64
    w, b, canon = prepared(n, k, g, True, True)
    x = torch.randn(48, k, generator=torch.Generator().manual_seed(4))
    exact = torch.nn.functional.linear(x, dequantize_ref(*canon, k), b)
    assert torch.equal(cpu_backend.dense_gemm(x, w, b, "fp32"), exact)
    y = cpu_backend.dense_gemm(x, w, b, "bf16")
    assert y.dtype == torch.float32
    err = ((y - exact).norm() / exact.norm()).item()
    assert 0 < err < 1e-2, err  # bf16 keeps 8 bits: ~2^-9 per rounding, three roundings
    assert cpu_backend.resolve_gemm("int8") == "int8"  # "auto": tests/test_gemm_w8a8.py
    with pytest.raises(KernelInputError, match="gemm must be one of"):
        cpu_backend.dense_gemm(x, w, b, "fp16")


def a8(x, w, b, isa="auto", int8_weights=False):
    """The 8-bit prefill GEMM (gemm_a8_cpu) on a prepared weight: exact planes, or 8-bit weight levels."""
    return torch.ops.dbquant.gemm_a8_cpu(x, w.planes, w.scales, w.offset, b, w.out_features, w.in_features,
                                         w.group_size, isa, int8_weights)


def a8_cases(k, g, planes):
    """The odd-shape cases of the 8-bit GEMMs' path tests, as (w, b, canon, x): partial tiles, K not a
    multiple of g, M not a multiple of the row blocks (M, N = 1, 7; 5, 33; 64, 16; 67, 1)."""
    for m, n, offset, bias in [(1, 7, True, True), (5, 33, False, True), (64, 16, True, False), (67, 1, False, False)]:
        w, b, canon = prepared(n, k, g, offset, bias, seed=k + g + n + planes, planes=planes)
        yield w, b, canon, torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)) * 3


def a8_every_isa(x, w, b, int8_weights=False):
    """a8 on every ISA path this CPU has, asserted bit for bit the scalar path's; returns that output."""
    y = a8(x, w, b, "scalar", int8_weights)
    for isa in ISAS:
        assert torch.equal(a8(x, w, b, isa, int8_weights), y), (isa, tuple(x.shape), w.out_features)
    return y


@pytest.mark.parametrize("planes", [1, 2, 3, 4])
@pytest.mark.parametrize("g", [8, 24, 64, 256])
@pytest.mark.parametrize("k", [8, 100, 576])
def test_gemm_a8_paths_agree_and_match_the_reference(k, g, planes):
    """The int8-activation prefill GEMM (csrc/cpu/gemm_a8.h): every ISA path gives the same bits
    (the same integers, the same float operations in the same order), equal to gemm_a8_ref up to
    float32 summation order, and within the header's bound of the exact x @ W^T: the activations'
    rounding, sum_j sx / 2 * sum_k |W - beta|. Odd shapes: partial tiles, K not a multiple of g,
    M not a multiple of the 2-row block; 4 planes take one half tile at a time."""
    for w, b, canon, x in a8_cases(k, g, planes):
        n = w.out_features
        y = a8_every_isa(x, w, b)
        ref = gemm_a8_ref(x, *canon[:2], canon[2], b, k, g)
        assert_matches(y, ref)
        exact = dbgemm_ref(x, *canon[:2], canon[2], b, k, g)
        _, _, sx, _ = quantize_a8_ref(x, g)
        wdev = (dequantize_ref(*canon, k) - (0 if canon[2] is None else
                canon[2].float().repeat_interleave(g, 1)[:, :k])).abs()  # |W - beta| [N, K]
        kp = sx.shape[1] * g
        wg = torch.nn.functional.pad(wdev, (0, kp - k)).view(n, -1, g).sum(-1)  # [N, G]
        bound = sx / 2 @ wg.T
        assert ((y - exact).abs() <= bound * (1 + 1e-4) + FP32_REORDER_LONG * exact.abs().max()).all()
        assert (y - exact).abs().max() > 0  # it does round: the bound is what is being tested


def test_gemm_a8_golden():
    """One hand-checked output: x = [1, -2, 0.5, 0, ...] over one group of 8, two planes, alpha = (1, 2),
    bits 0b0101 / 0b0011. lo = -2, hi = 1: step 1/85, zero point 170, codes 255, 0, 212.5 -> 212 (half to
    even), 170...; x - z: 85, -170, 42. D_1 = 85 + 42 = 127, D_2 = 85 - 170 = -85;
    y = (1 * 127 + 2 * (-85)) / 85 = -43/85 (exact x @ W^T: 1 + 0.5 + 2 * (1 - 2) = -0.5)."""
    qweight = torch.tensor([[[0b0101]], [[0b0011]]], dtype=torch.uint8)  # [P=2, N=1, Kp/8=1]
    scales = torch.tensor([[[1.0, 2.0]]]).half()  # [N, G, P]
    w = cpu_backend.prepare_cpu(qweight, scales, None, 8, 8)
    x = torch.tensor([[1.0, -2.0, 0.5, 0, 0, 0, 0, 0]])
    u, z, sx, _ = quantize_a8_ref(x, 8)
    assert u.tolist() == [[255, 0, 212, 170, 170, 170, 170, 170]] and z.tolist() == [[170]]
    for isa in ISAS:
        y = a8(x, w, None, isa)
        assert torch.allclose(y, torch.tensor([[-43 / 85]]), rtol=1e-6), (isa, y)
    assert torch.equal(dbgemm_ref(x, qweight, scales, None, None, 8, 8), torch.tensor([[-0.5]]))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gemm_a8_int16_sums_at_their_limits(sign):
    """Groups of 256 channels (kA8MaxGroup) with every bit set and the codes at their ends: x = +c gives
    codes 255 and zero point 0, x = -c codes 0 and zero point 255, so each of the AVX2 kernel's int16 sums
    (128 channels) starts at 0 or -255 * 128 and ends at +-255 * 128 = +-32640, next to int16's limits.
    D = +-255 * 256 must come out exact on every path. A row alternating -c and +c (c = 255): step 2,
    z = round_half_even(127.5) = 128, codes 0 and 255 (clamped from 256), D = 128 * (0 - 128 + 255 - 128)
    = -128 per plane, y = 2 * 2 * -128 = -512. A row of +-1e-38 (range below 2^-120) gets codes 0, y = 0."""
    k = g = 256
    qweight = torch.full((2, 3, k // 8), 255, dtype=torch.uint8)  # [P, N, Kp/8]: all bits set
    scales = torch.ones(3, 1, 2).half()
    w = cpu_backend.prepare_cpu(qweight, scales, None, k, g)
    x = torch.full((3, k), 255 * sign)  # step 1: codes are x itself
    x[1, ::2] = -255 * sign
    x[2] = 1e-38 * sign  # a range below 2^-120: codes z = 0 (255 / range would overflow float32)
    u, z, sx, _ = quantize_a8_ref(x, g)
    assert u[0].unique().tolist() == [255 if sign > 0 else 0] and z[0].tolist() == [0 if sign > 0 else 255]
    assert sx[0].tolist() == [1.0] and sx[1].tolist() == [2.0]
    assert u[2].unique().tolist() == [0] and z[2].tolist() == [0]
    want = torch.tensor([[2 * 255 * sign * k], [-512.0], [0.0]]).expand(3, 3)  # (D_1 + D_2) * sx
    for isa in ISAS:
        assert torch.equal(a8(x, w, None, isa), want), isa
    assert torch.equal(gemm_a8_ref(x, qweight, scales, None, None, k, g), want)


def test_gemm_a8_nonfinite_rows_and_limits():
    """A NaN or Inf activation makes its row's outputs NaN (as x @ W^T would), other rows exact as
    before; a group over 256 channels (int16 sums) is refused by the op and takes fp32 in dense_gemm."""
    n, k, g = 40, 200, 64
    w, b, canon = prepared(n, k, g, True, True)
    x = torch.randn(6, k, generator=torch.Generator().manual_seed(1))
    clean = a8(x, w, b)
    x[2, 7], x[4, 150] = float("nan"), float("inf")
    y = a8(x, w, b)
    assert torch.isnan(y[[2, 4]]).all() and torch.equal(y[[0, 1, 3, 5]], clean[[0, 1, 3, 5]])
    assert torch.isnan(gemm_a8_ref(x, *canon[:2], canon[2], b, k, g)[[2, 4]]).all()
    assert torch.equal(cpu_backend.dense_gemm(x[:2], w, b, "int8"), clean[:2])
    wide, bw, _ = prepared(16, 600, 512, False, True)
    x2 = torch.randn(3, 600)
    with pytest.raises(RuntimeError, match="group_size must be <= 256"):
        a8(x2, wide, bw)
    assert torch.equal(cpu_backend.dense_gemm(x2, wide, bw, "int8"), cpu_backend.dense_gemm(x2, wide, bw, "fp32"))


def test_long_inputs_use_dequantize_and_blas():
    n, k, g = 40, 200, 64
    w, b, canon = prepared(n, k, g, True, True)
    x = torch.randn(cpu_backend.LUT_MAX_ROWS + 7, k)
    y = cpu_backend.run_cpu(x, w, b)  # auto: above LUT_MAX_ROWS rows
    assert torch.equal(y, torch.nn.functional.linear(x, dequantize_ref(*canon, k), b))
    assert_matches(y, cpu_backend.run_cpu(x, w, b, ISAS[0]))


def test_empty_batch():
    qweight, scales, _, _ = make_layer(5, 24, 8, False, False)
    y = cpu_backend.dbgemm_cpu(torch.randn(0, 24), qweight, scales, None, None, 24, 8)
    assert y.shape == (0, 5)


def test_thread_count_does_not_change_result():
    n, k, g = 1536, 576, 64
    w, b, canon = prepared(n, k, g, True, True)
    x = torch.randn(3, k)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = cpu_backend.run_cpu(x, w, b)
        torch.set_num_threads(max(2, old))
        y2 = cpu_backend.run_cpu(x, w, b)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1, y2)  # each output is computed by one thread, in one order
    assert_matches(y1, dbgemm_ref(x, *canon, b, k, g))


# ---- the binding's input validation -------------------------------------------------

K, G_SIZE, N = 300, 64, 6  # G = 5 groups, Kp = 320, C8 = 40 bytes per row, T = 1 tile


@pytest.fixture
def args():
    w, b, _ = prepared(N, K, G_SIZE, True, True)
    w = t16.with_cols(w, 1)  # the messages name the unit order's shapes
    return dict(x=torch.randn(2, K), planes=w.planes, scales=w.scales, offset=w.offset, bias=b)


def call(a, out_features=N, in_features=K, group_size=G_SIZE):
    return torch.ops.dbquant.dbgemm_cpu(a["x"], a["planes"], a["scales"], a["offset"], a["bias"],
                                        out_features, in_features, group_size)


@pytest.mark.parametrize("name,bad,match", [
    ("x", lambda a: a["x"].double(), r"x must be Float, got Double"),
    ("x", lambda a: a["x"].half(), r"x must be Float, got Half"),
    ("planes", lambda a: a["planes"].to(torch.int8), r"planes must be Byte, got Char"),
    ("scales", lambda a: a["scales"].float(), r"scales must be Half, got Float"),
    ("offset", lambda a: a["offset"].double(), r"offset must be Half, got Double"),
    ("bias", lambda a: a["bias"].half(), r"bias must be Float, got Half"),
    ("x", lambda a: torch.randn(K, 2).t(), r"x must be contiguous"),
])
def test_error_dtype_and_layout(args, name, bad, match):
    args[name] = bad(args)
    with pytest.raises(RuntimeError, match=match):
        call(args)


@pytest.mark.parametrize("name,bad,match", [
    ("planes", lambda a: a["planes"][:, :36].contiguous(),
     r"planes must have shape \[1, 40, 2, 16\] .* got \[1, 36, 2, 16\]"),
    ("x", lambda a: a["x"][:, :299].contiguous(), r"x must be \[M, 300\] \(in_features\), got shape \[2, 299\]"),
    ("x", lambda a: a["x"].reshape(1, 2, K), r"x must be \[M, 300\] \(in_features\), got shape \[1, 2, 300\]"),
    ("scales", lambda a: a["scales"][:, :4].contiguous(),
     r"scales must have shape \[1, 5, 2, 16\] .* got \[1, 4, 2, 16\]"),
    ("offset", lambda a: a["offset"][:, :3].contiguous(), r"offset must have shape \[1, 5, 16\] .* got \[1, 3, 16\]"),
    ("bias", lambda a: a["bias"][:3].contiguous(), r"bias must have shape \[6\] .* got \[3\]"),
])
def test_error_shape(args, name, bad, match):
    args[name] = bad(args)
    with pytest.raises(RuntimeError, match=match):
        call(args)


def test_error_group_size_and_features(args):
    with pytest.raises(RuntimeError, match="group_size must be a positive multiple of 8, got 12"):
        call(args, group_size=12)
    with pytest.raises(RuntimeError, match="planes must have shape \\[2, 40, 2, 16\\]"):
        call(args, out_features=17)  # 17 rows need 2 tiles
