"""Reference path, kernel registry, fake-quant and packed linears."""

import pytest
import torch

from dbquant.backends import cpu as cpu_backend
from dbquant.backends import cuda as cuda_backend
from dbquant.backends import reference, registry
from dbquant.errors import DbquantError
from dbquant.model.modules import FakeQuantLinear, PackedLinear
from dbquant.quant import fdb
from tests.tolerances import FP32_REORDER


def _quantized(n, k, g, offset, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    return w, fdb.quantize_fdb(w, g, offset=offset, iters=2)


@pytest.mark.parametrize("n,k,g,m,offset,bias", [(7, 100, 64, 1, False, False), (33, 576, 64, 5, True, True),
                                                 (1, 24, 8, 3, False, True), (16, 300, 128, 16, True, False)])
def test_reference_equals_dense_matmul(n, k, g, m, offset, bias):
    _, q = _quantized(n, k, g, offset)
    lin = PackedLinear.from_weight(q, torch.randn(n) if bias else None, backend="ref")
    x = torch.randn(2, m, k)
    dense = x @ q.dequantize().T + (lin.bias if bias else 0)
    y = reference.dbgemm_ref(x, lin.qweight, lin.scales, lin.offset, lin.bias, k, g)
    assert y.shape == (2, m, n)
    torch.testing.assert_close(y, dense, rtol=FP32_REORDER, atol=FP32_REORDER)
    torch.testing.assert_close(lin(x), dense, rtol=FP32_REORDER, atol=FP32_REORDER)


def test_reference_rejects_inconsistent_shapes():
    _, q = _quantized(4, 64, 32, False)
    lin = PackedLinear.from_weight(q)
    with pytest.raises(DbquantError, match=r"x has shape \(1, 63\) but in_features=64"):
        reference.dbgemm_ref(torch.randn(1, 63), lin.qweight, lin.scales, None, None, 64, 32)
    with pytest.raises(DbquantError, match=r"scales must have shape \(4, 1, 2\), got \(4, 2, 2\)"):
        reference.dbgemm_ref(torch.randn(1, 64), lin.qweight, lin.scales, None, None, 64, 64)
    with pytest.raises(ValueError):  # still a ValueError for callers written against the old check
        reference.dbgemm_ref(torch.randn(1, 63), lin.qweight, lin.scales, None, None, 64, 32)


def test_registry():
    assert registry.resolve("ref") == "ref"
    # exactly the first available backend of the CPU preference: the C++ kernel when built
    assert registry.resolve("auto", "cpu") == ("cpu" if cpu_backend.load_cpu() else "ref")
    assert registry.get("dbgemm", "ref") is reference.dbgemm_ref
    with pytest.raises(DbquantError, match="unknown backend"):
        registry.resolve("nope")
    with pytest.raises(DbquantError, match=r"unknown op 'nope'"):
        registry.get("nope", "ref")
    if cuda_backend.load_cuda():  # a CUDA build with a GPU: the backend resolves
        assert registry.resolve("cuda") == "cuda"
        assert registry.resolve("auto", "cuda", rows=1) == "cuda"
    else:
        with pytest.raises(DbquantError, match="not available"):
            registry.resolve("cuda")
    with pytest.raises(ValueError):
        registry.register("dbgemm", "fpga")


@pytest.mark.parametrize("offset", [False, True])
def test_fake_quant_forward_and_ste(offset):
    w, q = _quantized(12, 80, 16, offset)
    fq = FakeQuantLinear(w, q, torch.zeros(12))
    x = torch.randn(3, 80)
    torch.testing.assert_close(fq(x), x @ q.dequantize().T, rtol=FP32_REORDER, atol=FP32_REORDER)
    fq(x).square().sum().backward()
    assert fq.alpha.grad is not None and fq.alpha.grad.abs().sum() > 0
    assert fq.weight.grad is not None and fq.weight.grad.abs().sum() > 0  # straight-through
    if offset:
        assert fq.offset.grad.abs().sum() > 0
    # export -> pack -> packed forward equals the fake-quant forward
    packed = PackedLinear.from_weight(fq.export(), fq.bias.detach())
    torch.testing.assert_close(packed(x), fq(x), rtol=FP32_REORDER, atol=FP32_REORDER)


def _unfused_fake_quant(wg, alpha, offset):
    """The fake-quant weight written out: bits under no_grad, exact sum, straight-through add."""
    with torch.no_grad():
        planes = fdb.assign_bits(wg, alpha, offset)
    return fdb.reconstruct(planes, alpha, offset) + (wg - wg.detach())


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("offset", [False, True])
def test_fused_fake_quant_equals_bits_then_sum(k, offset):
    """fdb.fake_quant (one autograd op, one saved uint8 code per weight) is the unfused formula:
    the same forward values bit for bit, and the same gradients for weight, scales and offset."""
    gen = torch.Generator().manual_seed(10 * k + offset)
    wg = torch.randn(13, 3, 16, generator=gen)
    wg[0, 0, :4] = 0.0  # exact ties with code 0's level
    alpha = torch.randn(13, 3, k, generator=gen) * 0.7
    beta = torch.randn(13, 3, generator=gen) * 0.1 if offset else None
    grads, outs = [], []
    for f in (_unfused_fake_quant, fdb.fake_quant):
        leaves = [t.clone().requires_grad_() for t in (wg, alpha) + ((beta,) if offset else ())]
        y = f(leaves[0], leaves[1], leaves[2] if offset else None)
        (y * torch.linspace(-1, 2, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([t.grad for t in leaves])
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fake_quant_linear_padded_channels():
    """K not a multiple of the group: the padded path (to_groups) trains and matches its export."""
    w, q = _quantized(6, 50, 16, False)
    fq = FakeQuantLinear(w, q)
    x = torch.randn(4, 50)
    fq(x).sum().backward()
    assert fq.weight.grad.shape == (6, 50) and fq.alpha.grad.abs().sum() > 0
    torch.testing.assert_close(fq(x), x @ fq.export().dequantize().T, rtol=FP32_REORDER, atol=FP32_REORDER)


def test_fake_quant_training_lowers_output_error():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(32, 128, generator=gen)
    x = torch.randn(256, 128, generator=gen)
    fq = FakeQuantLinear(w, fdb.quantize_fdb(w, 32, iters=0))
    target = x @ w.T
    loss0 = (fq(x) - target).square().mean().item()
    opt = torch.optim.Adam([fq.alpha], lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        loss = (fq(x) - target).square().mean()
        loss.backward()
        opt.step()
    assert loss.item() < 0.9 * loss0


def test_eight_bit_scales_export_and_pack():
    """A FakeQuantLinear of an 8-bit-scale weight trains float32 scales; export rounds them onto the
    8-bit grid and reassigns the bits against the rounded ones, and the packed module computes exactly
    that weight (its float16 scales are the decoded codes)."""
    from dbquant.format import layout

    gen = torch.Generator().manual_seed(5)
    w = torch.randn(24, 100, generator=gen) * 0.05
    fq = FakeQuantLinear(w, fdb.quantize_fdb(w, 32, scale_bits=8))
    with torch.no_grad():
        fq.alpha.mul_(1.0 + 0.01 * torch.randn(fq.alpha.shape, generator=gen))  # off the grid, as training leaves it
    q = fq.export()
    assert q.scale_bits == 8 and q.layout.scale_bits == 8
    assert torch.equal(q.alpha, layout.storable_scales(q.alpha, 8))  # on the grid
    wg = fdb.to_groups(fq.weight.detach(), 32)
    want = fdb.assign_bits(wg, q.alpha, None).reshape(2, 24, -1)
    want[:, :, 100:] = 0
    assert torch.equal(q.planes, want)
    m = PackedLinear.from_weight(q)
    assert m.scales.dtype == torch.int8 and torch.equal(m.float_scales().float(), q.alpha)
    assert torch.equal(m.dequantize(), q.dequantize())
