"""The prefill GEMM's 8-bit weight levels ("w8a8", csrc/cpu/gemm_a8.h): the levels' rule, every ISA path
against the torch definition (gemm_a8_ref(int8_weights=True)) bit for bit across paths, in both byte
orders, within the stated bound of the exact-plane GEMM; a golden output; non-finite scales; the
choice of "auto".

Needs the extension ``dbquant._C`` (CI sets DBQUANT_REQUIRE_NATIVE=1: these tests then fail without it).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from dbquant.backends import cpu as cpu_backend
from dbquant.backends import t16
from dbquant.backends.cpuinfo import bf16_kind
from dbquant.backends.reference import gemm_a8_ref, quantize_a8_ref, w8_levels_ref
from dbquant.format import layout
from tests.test_cpu_kernel import a8, a8_cases, a8_every_isa, assert_matches, prepared

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    HAVE_NATIVE = cpu_backend.load_cpu()
ISAS = torch.ops.dbquant.cpu_isas() if HAVE_NATIVE else []


@pytest.fixture(autouse=True)
def _need_native():
    if HAVE_NATIVE:
        return
    reason = f"dbquant._C is not importable ({cpu_backend._cpu_error}); build it with `{cpu_backend.BUILD_HINT}`"
    if os.environ.get("DBQUANT_REQUIRE_NATIVE") == "1":
        pytest.fail(f"DBQUANT_REQUIRE_NATIVE=1 but {reason}")
    pytest.skip(reason)


def w8(x, w, b, isa="auto"):
    return a8(x, w, b, isa, int8_weights=True)


@pytest.mark.parametrize("planes", [1, 2, 3, 4])
def test_levels_fit_int8_and_move_alpha_by_half_a_step(planes):
    """w8_levels_ref: every sum of a subset of the r_p (a channel's level q) is within +-127, and each
    alpha_p moves by <= s / 2 (s r_p against alpha_p); the cases at the edge: equal alphas of one sign
    (alpha / s = (127 - P / 2) / P each, rounding up on every plane), opposite signs, zeros."""
    gen = torch.Generator().manual_seed(planes)
    a = torch.randn(500, 7, planes, generator=gen) * torch.rand(500, 7, 1, generator=gen) * 3
    a[0] = 1.0  # one sign, equal: the subset of all planes is the largest
    a[1] = -0.25
    a[2, :, 0] = 2.0
    if planes > 1:
        a[2, :, 1:] = -1.0
    a[3] = 0.0
    a = a.half()
    r, s = w8_levels_ref(a)
    assert r.dtype == torch.int8 and s.dtype == torch.float32 and r.shape == a.shape and s.shape == a.shape[:2]
    subsets = torch.tensor([[(m >> p) & 1 for p in range(planes)] for m in range(1, 1 << planes)])
    sums = torch.einsum("ngp,sp->ngs", r.int(), subsets.int())
    assert sums.abs().max() <= 127
    assert sums.abs().max() >= 120  # the range is used: L / s = 127 - P / 2
    err = (s[..., None] * r.float() - a.float()).abs()
    assert (err <= s[..., None] / 2 + 1e-6 * a.float().abs()).all()  # (+ the float product's rounding)
    assert (s[3] == 0).all() and (r[3] == 0).all()


def test_levels_of_nonfinite_scales():
    """A NaN or an infinite alpha gives the group s = NaN and r = 0 (so its outputs are NaN, as
    x @ W^T's would be); the other groups are unaffected."""
    a = torch.tensor([[[1.0, -0.5], [float("nan"), 0.5], [float("inf"), 1.0], [0.25, 0.25]]]).half()
    r, s = w8_levels_ref(a)
    assert torch.isnan(s[0, 1:3]).all() and (r[0, 1:3] == 0).all()
    assert s[0, 0] == 1.0 / 126.0 and r[0, 0].tolist() == [126, -63]
    assert r[0, 3].tolist() == [63, 63] and s[0, 3] == torch.tensor(0.5) / 126.0


@pytest.mark.parametrize("planes", [1, 2, 3, 4])
@pytest.mark.parametrize("g", [8, 24, 64, 256])
@pytest.mark.parametrize("k", [8, 100, 576])
def test_paths_agree_and_match_the_reference(k, g, planes):
    """Every ISA path gives the same bits (the same integers, the same float operations in order: on this
    CPU's AVX-512 VNNI kernel, and the scalar loop AVX2 CPUs take), equal to gemm_a8_ref(int8_weights=True)
    up to float32 summation order, in both byte orders of the planes; and the levels' effect is within
    its bound: |y - y_exact_planes| <= sum_j sx[m, j] sum_p s[n, j] / 2 * sum_{k in j} |u - z| b_p
    (each alpha moved by <= s / 2; the activations' rounding is the same on both sides)."""
    for w, b, canon, x in a8_cases(k, g, planes):
        m, n = x.shape[0], w.out_features
        y = a8_every_isa(x, w, b, int8_weights=True)
        for cols in {1, 4} - {w.cols}:
            if g % t16.DWORD_GROUP == 0:
                other = t16.with_cols(w, cols)
                for isa in ISAS:
                    assert torch.equal(w8(x, other, b, isa), y), (isa, cols)
        ref = gemm_a8_ref(x, *canon[:2], canon[2], b, k, g, int8_weights=True)
        assert_matches(y, ref)
        exact_planes = gemm_a8_ref(x, *canon[:2], canon[2], b, k, g)
        u, z, sx, _ = quantize_a8_ref(x, g)
        _, s = w8_levels_ref(canon[1])
        bits = layout.unpack_bits(canon[0]).float()  # [P, N, Kp]
        kp = u.shape[1]
        dev = (u.float().view(m, -1, g) - z.float()[..., None]).abs()  # [M, G, g]
        dabs = torch.einsum("mgk,pngk->mng", dev, bits.view(planes, n, kp // g, g))  # sum over p too
        bound = torch.einsum("mng,mg,ng->mn", dabs, sx, s / 2)
        assert ((y - exact_planes).abs() <= bound * (1 + 1e-4) + 1e-4 * exact_planes.abs().max()).all()
        assert (y - exact_planes).abs().max() > 0  # the levels do round


def test_golden():
    """One hand-checked output: x = [1, -2, 0.5, 0, ...] over one group of 8 (codes 255, 0, 212, 170...,
    zero point 170, step 1/85: x - z = 85, -170, 42, 0...), two planes, alpha = (1, -0.7) (float16:
    -0.7001953125), bits 0b0101 / 0b0011. L = 1, s = 1/126, r = (126, round(-88.2246) = -88); the levels
    q = 126 - 88 = 38, -88, 126, 0...; D' = 85 * 38 + 170 * 88 + 42 * 126 = 23482;
    y = s * D' * sx = 23482 / (126 * 85)  (the exact planes: (127 + 0.7001953125 * 85) / 85)."""
    qweight = torch.tensor([[[0b0101]], [[0b0011]]], dtype=torch.uint8)  # [P=2, N=1, Kp/8=1]
    scales = torch.tensor([[[1.0, -0.7]]]).half()  # [N, G, P]
    w = cpu_backend.prepare_cpu(qweight, scales, None, 8, 8)
    x = torch.tensor([[1.0, -2.0, 0.5, 0, 0, 0, 0, 0]])
    want = torch.tensor([[23482 / (126 * 85)]])
    for isa in ISAS:
        torch.testing.assert_close(w8(x, w, None, isa), want, rtol=1e-6, atol=0), isa
    torch.testing.assert_close(gemm_a8_ref(x, qweight, scales, None, None, 8, 8, int8_weights=True), want,
                               rtol=1e-6, atol=0)
    exact = gemm_a8_ref(x, qweight, scales, None, None, 8, 8)
    torch.testing.assert_close(exact, torch.tensor([[(127 + 0.7001953125 * 85) / 85]]), rtol=1e-6, atol=0)


def test_nonfinite_scales_and_activations():
    """A group with a NaN alpha makes its row's outputs NaN on every path, the other rows as before; a NaN
    activation makes its row of outputs NaN; dense_gemm("w8a8") is the op; groups over 256 take fp32."""
    n, k, g = 40, 200, 64
    w, b, canon = prepared(n, k, g, True, True)
    x = torch.randn(6, k, generator=torch.Generator().manual_seed(1))
    clean = w8(x, w, b)
    assert torch.equal(cpu_backend.dense_gemm(x, w, b, "w8a8"), clean)
    scales = canon[1].clone()
    scales[5, 1, 0] = float("nan")
    bad = cpu_backend.prepare_cpu(canon[0], scales, canon[2], k, g)
    for isa in ISAS:
        y = w8(x, bad, b, isa)
        assert torch.isnan(y[:, 5]).all(), isa
        keep = [i for i in range(n) if i != 5]
        assert torch.equal(y[:, keep], clean[:, keep]), isa
    x[3, 9] = float("nan")
    y = w8(x, w, b)
    assert torch.isnan(y[3]).all() and torch.equal(y[[0, 1, 2, 4, 5]], clean[[0, 1, 2, 4, 5]])
    wide, bw, _ = prepared(16, 600, 512, False, True)
    x2 = torch.randn(3, 600)
    assert torch.equal(cpu_backend.dense_gemm(x2, wide, bw, "w8a8"), cpu_backend.dense_gemm(x2, wide, bw, "fp32"))


def test_auto_prefers_w8a8_where_vnni_runs_it():
    """resolve_gemm("auto"): bf16 on AMX, w8a8 where the AVX-512 VNNI kernel runs, bf16 where bf16 is
    otherwise fast, int8 where AVX2 is the fastest path, else fp32; a forced kind is itself."""
    fastest = ISAS[0]
    vnni = fastest == "avx512" and torch.ops.dbquant.cpu_avx512_has("vnni")
    want = ("bf16" if bf16_kind() == "amx" else "w8a8" if vnni else "bf16" if cpu_backend.fast_bf16_cpu()
            else "int8" if fastest == "avx2" else "fp32")
    assert cpu_backend.resolve_gemm("auto") == want
    assert cpu_backend.resolve_gemm("w8a8") == "w8a8"
    with pytest.raises(RuntimeError, match="unknown AVX-512 extension"):
        torch.ops.dbquant.cpu_avx512_has("amx")


@pytest.mark.parametrize("hide", ["bitalg", "vnni", "bf16", "vnni,bitalg"])
def test_fallbacks_of_hidden_extensions(hide):
    """With an AVX-512 extension hidden (cpu_backend.hidden_exts), this CPU runs what a CPU without it runs:
    no BITALG, the portable level expansion on dword rows; no VNNI, the scalar loop for w8a8 and the AVX2
    kernel for the exact planes (and "auto" no longer w8a8); no BF16, the integer-rounding bf16
    dequantization. Every one gives the same bits as the default path; the setting comes back on exit."""
    n, k, g = 40, 256, 64
    w, b, canon = prepared(n, k, g, True, True, planes=2)
    x = torch.randn(37, k, generator=torch.Generator().manual_seed(3))
    want = {"w8": w8(x, w, b), "a8": torch.ops.dbquant.gemm_a8_cpu(x, w.planes, w.scales, w.offset, b, n, k, g),
            "bf16": torch.ops.dbquant.dequantize_t_cpu(w.planes, w.scales, w.offset, n, k, g, True)}
    before = torch.ops.dbquant.cpu_hide_exts("")
    assert before == ""
    with cpu_backend.hidden_exts(hide):
        for ext in hide.split(","):
            assert not torch.ops.dbquant.cpu_avx512_has(ext)
        assert torch.equal(w8(x, w, b), want["w8"])
        assert torch.equal(torch.ops.dbquant.gemm_a8_cpu(x, w.planes, w.scales, w.offset, b, n, k, g), want["a8"])
        assert torch.equal(torch.ops.dbquant.dequantize_t_cpu(w.planes, w.scales, w.offset, n, k, g, True),
                           want["bf16"])
        if "vnni" in hide:
            assert cpu_backend.resolve_gemm("auto") != "w8a8"
    assert torch.ops.dbquant.cpu_hide_exts("") == ""
    with pytest.raises(RuntimeError, match="unknown AVX-512 extension"):
        torch.ops.dbquant.cpu_hide_exts("vnni,amx")
