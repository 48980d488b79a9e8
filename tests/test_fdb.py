"""FDB math: nearest-level assignment, the paper's init, refinement, quality floors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dbquant.quant import fdb
from tests.tolerances import FP16_SCALE, FP32_REORDER

finite = st.floats(-10, 10, allow_nan=False, width=32)


def sqnr_db(w, w_hat):
    return 10 * torch.log10(w.square().sum() / (w - w_hat).square().sum()).item()


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=1, max_size=16), finite, finite, st.one_of(st.none(), finite))
def test_assign_bits_is_nearest_level(ws, a1, a2, beta):
    wg = torch.tensor(ws).view(1, 1, -1)
    alpha = torch.tensor([[[a1, a2]]])
    off = None if beta is None else torch.tensor([[beta]])
    planes = fdb.assign_bits(wg, alpha, off)
    q = fdb.reconstruct(planes, alpha, off)
    lv = fdb.levels(alpha, off).view(1, 1, 1, 4)
    best = (wg.unsqueeze(-1) - lv).abs().amin(-1)
    assert torch.allclose((wg - q).abs(), best, atol=FP32_REORDER)
    assert planes.shape[0] == 2 and set(planes.unique().tolist()) <= {0, 1}


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=1, max_size=16), st.floats(0.01, 5))
def test_paper_formula_matches_general_assignment(ws, s):
    """With alpha1 = 2s, alpha2 = -s (alpha1 > -alpha2 > 0) the paper's H-formula is nearest-level."""
    wg = torch.tensor(ws).view(1, 1, -1)
    alpha = fdb.paper_init(torch.tensor([[s]]))
    pb1, pb2 = fdb.paper_bits(wg, alpha)
    planes = fdb.assign_bits(wg, alpha)
    q_paper, q = fdb.reconstruct(torch.stack([pb1, pb2]), alpha), fdb.reconstruct(planes, alpha)
    assert torch.allclose((wg - q_paper).abs(), (wg - q).abs(), atol=FP32_REORDER)


def test_paper_init_levels():
    alpha = fdb.paper_init(torch.tensor([[0.5]]))
    assert sorted(fdb.levels(alpha).flatten().tolist()) == [-0.5, 0.0, 0.5, 1.0]


def test_rtn_is_asymmetric_minmax_grid():
    w = torch.tensor([[-1.0, -0.2, 0.4, 2.0, 0.9, 1.3, -0.7, 0.1]])
    q = fdb.quantize_rtn(w, 8)
    step = 3.0 / 3
    expect = -1.0 + step * torch.round((w + 1.0) / step)
    assert torch.allclose(q.dequantize(), expect, atol=FP16_SCALE * w.abs().max().item())
    # stored as alpha1 = 2s, alpha2 = s, beta = the group's minimum
    assert q.alpha.tolist() == [[[2 * step, step]]] and q.offset.tolist() == [[-1.0]]


@pytest.mark.parametrize("offset", [False, True])
def test_refine_never_increases_error(offset):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=gen) * 0.02
    h = torch.rand(256, generator=gen) + 0.1
    wg, hg = fdb.to_groups(w, 64), fdb.group_importance(h, 256, 64)
    if offset:
        alpha, beta = fdb.rtn_init(wg, hg > 0)
    else:
        alpha, beta = fdb.search_scales(wg, hg)[0], None
    planes = fdb.assign_bits(wg, alpha, beta)
    before = fdb.group_error(wg, planes, alpha, beta, hg)
    *_, after = fdb.refine(wg, hg, alpha, beta, iters=10)
    assert (after <= before + 1e-12).all()
    assert after.sum() < 0.99 * before.sum()


def test_quality_floors_on_gaussian_weights():
    """SQNR floors (dB) per method at g64: a 2-bit Lloyd-Max quantizer of a Gaussian is ~9.3 dB."""
    w = torch.randn(512, 576, generator=torch.Generator().manual_seed(0)) * 0.02
    rtn = sqnr_db(w, fdb.quantize_rtn(w, 64).dequantize())
    searched = sqnr_db(w, fdb.quantize_fdb(w, 64, iters=0).dequantize())
    refined = sqnr_db(w, fdb.quantize_fdb(w, 64).dequantize())
    with_offset = sqnr_db(w, fdb.quantize_fdb(w, 64, offset=True).dequantize())
    assert rtn > 6.5
    assert searched > 8.8 and searched > rtn + 1.5
    assert refined > 9.2 and refined > searched
    assert with_offset > refined


def test_importance_weighting_lowers_weighted_error():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(128, 192, generator=gen)
    h = torch.ones(192)
    h[:16] = 100.0  # a few hot input channels, as in real activations
    plain = fdb.quantize_fdb(w, 64).dequantize()
    weighted = fdb.quantize_fdb(w, 64, importance=h).dequantize()
    werr = lambda wh: ((w - wh).square() * h).sum()  # noqa: E731
    assert werr(weighted) < 0.9 * werr(plain)


def test_sparsity_and_padding():
    w = torch.randn(16, 100, generator=torch.Generator().manual_seed(3))
    q = fdb.quantize_fdb(w, 64)
    assert q.b1.shape == (16, 128) and q.layout.groups == 2
    assert q.b1[:, 100:].sum() == 0 and q.b2[:, 100:].sum() == 0
    density = (q.b1[:, :100].float().mean() + q.b2[:, :100].float().mean()).item()
    assert 0.5 < density < 1.1  # a zero level keeps the planes sparse (~0.75-0.9 ones per weight)
    # scales are exactly representable in the stored float16
    assert torch.equal(q.alpha, q.alpha.half().float())


def test_degenerate_groups_stay_finite():
    w = torch.zeros(4, 64)
    w[1] = 1.0  # constant group
    w[2, 0] = 5.0  # a single outlier
    for q in (fdb.quantize_fdb(w, 64), fdb.quantize_fdb(w, 64, offset=True), fdb.quantize_rtn(w, 64)):
        wh = q.dequantize()
        assert torch.isfinite(wh).all()
        assert torch.equal(wh[0], torch.zeros(64))
        # the constant and the lone outlier come back up to the fp16 rounding of their scales
        assert torch.allclose(wh[1:3], w[1:3], rtol=FP16_SCALE, atol=FP32_REORDER)


# ---------------------------------------------------------------- k planes (format version 2)

@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.lists(finite, min_size=1, max_size=12), st.lists(finite, min_size=4, max_size=4),
       st.one_of(st.none(), finite))
def test_assign_bits_is_nearest_level_any_k(k, ws, alphas, beta):
    """For every k, the assigned code's level is a nearest one of the 2^k subset sums."""
    wg = torch.tensor(ws).view(1, 1, -1)
    alpha = torch.tensor(alphas[:k]).view(1, 1, k)
    off = None if beta is None else torch.tensor([[beta]])
    planes = fdb.assign_bits(wg, alpha, off)
    assert planes.shape == (k, 1, 1, len(ws)) and set(planes.unique().tolist()) <= {0, 1}
    q = fdb.reconstruct(planes, alpha, off)
    subset = torch.tensor([[sum(alphas[i] for i in range(k) if c >> (k - 1 - i) & 1) for c in range(2 ** k)]])
    lv = subset + (0.0 if beta is None else beta)
    assert torch.allclose(fdb.levels(alpha, off).view(-1), lv.view(-1), atol=FP32_REORDER * 8)
    best = (wg.view(-1, 1) - lv).abs().amin(-1)
    assert torch.allclose((wg - q).abs().view(-1), best, atol=FP32_REORDER * 8)


@pytest.mark.parametrize("k", [1, 3, 4])
def test_grid_init_levels_are_the_integer_grid(k):
    alpha = fdb.grid_init(torch.tensor([[0.5]]), k)
    half = 2 ** (k - 1)
    assert sorted(fdb.levels(alpha).flatten().tolist()) == [0.5 * v for v in range(1 - half, half + 1)]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_rtn_k_is_minmax_grid(k):
    w = torch.linspace(-1.0, 2.0, 16).view(1, 16)
    q = fdb.quantize_rtn(w, 16, planes=k)
    step = 3.0 / (2 ** k - 1)
    expect = -1.0 + step * torch.round((w + 1.0) / step)
    assert q.planes.shape == (k, 1, 16) and q.alpha.shape == (1, 1, k)
    assert torch.allclose(q.dequantize(), expect, atol=2 * FP16_SCALE * w.abs().max().item())


@pytest.mark.parametrize("offset", [False, True])
def test_error_falls_with_every_plane(offset):
    """k = 1..4 init (scale search or RTN start, least squares): each plane cuts the error >= 2.5x."""
    w = torch.randn(96, 200, generator=torch.Generator().manual_seed(5)) * 0.02
    errs = []
    for k in (1, 2, 3, 4):
        q = fdb.quantize_fdb(w, 64, offset=offset, planes=k)
        assert q.planes.shape == (k, 96, 256) and q.planes[:, :, 200:].sum() == 0
        assert torch.equal(q.alpha, q.alpha.half().float()) and q.layout.planes == k
        errs.append((w - q.dequantize()).square().sum().item())
    assert all(a > 2.5 * b for a, b in zip(errs, errs[1:])), errs


@pytest.mark.parametrize("k", [1, 3, 4])
def test_refine_never_increases_error_any_k(k):
    gen = torch.Generator().manual_seed(k)
    w = torch.randn(32, 128, generator=gen) * 0.02
    h = torch.rand(128, generator=gen) + 0.1
    wg, hg = fdb.to_groups(w, 32), fdb.group_importance(h, 128, 32)
    alpha = fdb.search_scales(wg, hg, k=k)[0]
    before = fdb.group_error(wg, fdb.assign_bits(wg, alpha), alpha, None, hg)
    *_, after = fdb.refine(wg, hg, alpha, None, iters=6)
    assert (after <= before + 1e-12).all() and after.sum() < before.sum()


@pytest.mark.parametrize("k", [0, 5, 2.0])
def test_bad_plane_count(k):
    from dbquant.errors import DbquantError
    with pytest.raises(DbquantError, match="plane count"):
        fdb.quantize_fdb(torch.zeros(2, 8), 8, planes=k)
