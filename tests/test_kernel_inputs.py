"""Regression tests of issue 17 (items 5 and 6): what the dbgemm kernels must refuse, and what
they must propagate (gradients, NaN/Inf) as the reference does.

Each test failed before its fix: integer/bool/complex x came back in x's dtype (uint8 wrapped);
a short ``scales`` was padded with zero rows by the CPU repack (silent garbage); a 0-dim x
raised IndexError and a last dim of 0 ZeroDivisionError in PackedLinear; ``registry.get`` of an
unknown op raised KeyError; the CPU op had no backward (x.grad None at <= 32 rows); and the
lookup tables turned NaN/Inf activations into finite outputs where the reference gives NaN.
"""

from __future__ import annotations

import pytest
import torch

from dbquant.backends import cpu as cpu_backend
from dbquant.backends import reference, registry
from dbquant.errors import DbquantError
from dbquant.model.modules import PackedLinear
from dbquant.quant import fdb
from tests.tolerances import FP32_REORDER, FP32_REORDER_LONG

HAVE_CPU = registry.available("cpu")
BACKENDS = ["ref"] + (["cpu"] if HAVE_CPU else [])
ISAS = torch.ops.dbquant.cpu_isas() if HAVE_CPU else []


def layer(n=20, k=72, g=32, offset=True, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = fdb.quantize_fdb(torch.randn(n, k, generator=gen), g, offset=offset, iters=1)
    return PackedLinear.from_weight(q, torch.randn(n, generator=gen) if bias else None, backend="ref")


def args(lin):
    return lin.qweight, lin.scales, lin.offset, lin.bias, lin.in_features, lin.group_size


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64, torch.bool, torch.complex64])
def test_non_float_activations_are_refused(backend, dtype):
    lin = layer()
    x = (torch.rand(3, 72) * 4).to(dtype)
    with pytest.raises(DbquantError, match=rf"dbgemm_{backend}: x must be float16, bfloat16, float32, float64, "
                                           rf"got {dtype}"):
        registry.get("dbgemm", backend)(x, *args(lin))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_dim_and_empty_last_dim_are_refused(backend):
    lin = layer()
    kernel = registry.get("dbgemm", backend)
    with pytest.raises(DbquantError, match=r"x must have at least 1 dim \(\[\.\.\., K\]\), got a 0-dim tensor"):
        kernel(torch.tensor(1.0), *args(lin))
    with pytest.raises(DbquantError, match=r"x has shape \(2, 0\) but in_features=72"):
        kernel(torch.zeros(2, 0), *args(lin))
    lin.backend = backend  # through the module: PackedLinear asks the registry for M first
    with pytest.raises(DbquantError, match="0-dim"):
        lin(torch.tensor(1.0))
    with pytest.raises(DbquantError, match=r"x has shape \(2, 0\) but in_features=72"):
        lin(torch.zeros(2, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_tensor_shape_is_checked(backend):
    lin = layer(n=20)
    q, s, o, b, k, g = args(lin)
    x = torch.randn(2, 72)
    kernel = registry.get("dbgemm", backend)
    # 17 rows of scales for 20 outputs: both pad to 2 tiles of 16, so the CPU repack used to
    # fill rows 17..19 with zero scales and compute wrong outputs silently.
    with pytest.raises(DbquantError, match=r"scales must have shape \(20, 3, 2\), got \(17, 3, 2\)"):
        kernel(x, q, s[:17], o, b, k, g)
    with pytest.raises(DbquantError, match=r"offset must have shape \(20, 3\), got \(20, 2\)"):
        kernel(x, q, s, o[:, :2], b, k, g)
    with pytest.raises(DbquantError, match=r"bias must have shape \(20,\), got \(19,\)"):
        kernel(x, q, s, o, b[:19], k, g)
    with pytest.raises(DbquantError, match=r"qweight must be uint8 \[k, N, 12\] \(k in 1..4\) .* got \(2, 20, 11\)"):
        kernel(x, q[..., :11], s, o, b, k, g)
    with pytest.raises(DbquantError, match=r"qweight must be uint8 \[k, N, 12\] \(k in 1..4\) .* got \(5, 20, 12\)"):
        kernel(x, q[[0, 1, 0, 1, 0]], s, o, b, k, g)  # five planes: more than the format holds
    with pytest.raises(DbquantError, match=r"scales must have shape \(20, 3, 3\), got \(20, 3, 2\)"):
        kernel(x, q[[0, 1, 0]], s, o, b, k, g)  # three planes, two scales per group
    with pytest.raises(DbquantError, match=r"scales must be float16, bfloat16, float32, got torch.int16"):
        kernel(x, q, s.short(), o, b, k, g)
    with pytest.raises(ValueError):  # KernelInputError is a ValueError too
        kernel(x, q, s[:17], o, b, k, g)


@pytest.mark.skipif(not HAVE_CPU, reason="dbquant._C is not built")
def test_prepared_path_checks_x_and_bias():
    lin = layer()
    w = cpu_backend.prepare_cpu(lin.qweight, lin.scales, lin.offset, 72, 32)
    with pytest.raises(DbquantError, match=r"x must be .* got torch.uint8"):
        cpu_backend.run_cpu(torch.ones(1, 72, dtype=torch.uint8), w, lin.bias)
    with pytest.raises(DbquantError, match=r"bias must have shape \(20,\), got \(3,\)"):
        cpu_backend.run_cpu(torch.randn(1, 72), w, torch.zeros(3))


def test_unknown_op_is_a_clear_error():
    with pytest.raises(DbquantError, match=r"unknown op 'dbgemv'; the registry has \('dbgemm'"):
        registry.get("dbgemv", "ref")
    with pytest.raises(DbquantError, match=r"unknown op 'dbgemv'"):
        registry.get("dbgemv")


@pytest.mark.skipif(not HAVE_CPU, reason="dbquant._C is not built")
@pytest.mark.parametrize("rows", [1, 5, cpu_backend.LUT_MAX_ROWS, cpu_backend.LUT_MAX_ROWS + 3])
def test_cpu_backend_has_gradients(rows):
    """dX = dY @ W and dBias = sum of dY, as the reference's autograd gives, on both sides of
    the lookup-table / BLAS switch."""
    lin = layer()
    grads = {}
    for backend in ("ref", "cpu"):
        lin.backend = backend
        lin.zero_grad()
        x = torch.randn(rows, 72, generator=torch.Generator().manual_seed(rows), requires_grad=True)
        dy = torch.randn(rows, 20, generator=torch.Generator().manual_seed(1))
        (lin(x) * dy).sum().backward()
        assert x.grad is not None, backend
        grads[backend] = (x.grad, lin.bias.grad.clone())
    for got, want in zip(grads["cpu"], grads["ref"]):
        torch.testing.assert_close(got, want, rtol=FP32_REORDER, atol=FP32_REORDER)
    # the isa-forced lookup-table path differentiates too
    x = torch.randn(2, 72, requires_grad=True)
    w = cpu_backend.prepare_cpu(lin.qweight, lin.scales, lin.offset, 72, 32)
    cpu_backend.run_cpu(x, w, None, ISAS[-1]).sum().backward()
    torch.testing.assert_close(x.grad, lin.dequantize().sum(0).expand(2, -1), rtol=FP32_REORDER, atol=FP32_REORDER)


@pytest.mark.skipif(not HAVE_CPU, reason="dbquant._C is not built")
@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_propagate_as_in_ref(offset, bad):
    """Without an offset a weight of 0 (both bits 0) meets x = NaN/Inf as 0 * NaN = NaN in the
    reference, but the lookup tables never multiply it: such outputs used to come out finite."""
    lin = layer(n=37, k=100, g=32, offset=offset, bias=True, seed=5)
    x = torch.randn(4, 100, generator=torch.Generator().manual_seed(2))
    x[1, 7] = bad
    x[3, 99] = float("nan")
    ref = reference.dbgemm_ref(x, *args(lin))
    assert not ref[1].isfinite().all() and ref[3].isnan().all() and ref[[0, 2]].isfinite().all()
    w = cpu_backend.prepare_cpu(lin.qweight, lin.scales, lin.offset, 100, 32)
    for isa in ISAS + ["auto"]:
        y = cpu_backend.run_cpu(x, w, lin.bias, isa)
        assert torch.equal(y.isnan(), ref.isnan()), isa
        assert torch.equal(y.isinf(), ref.isinf()) and torch.equal(y[y.isinf()], ref[ref.isinf()]), isa
        torch.testing.assert_close(y, ref, rtol=FP32_REORDER_LONG, atol=FP32_REORDER_LONG, equal_nan=True, msg=isa)


def test_cuda_shared_memory_limit_is_checked_before_the_op():
    """The CUDA GEMV's limit (csrc/cuda/dbgemv.h: 4 rows of float16 scales and offsets in 48 KiB) is
    refused in Python with the way out; this runs without a GPU."""
    from dbquant.backends import cuda

    assert cuda.shared_memory_bytes(3072, False, 2) == 48 * 1024  # the header's stated limits
    assert cuda.shared_memory_bytes(2048, True, 2) == 48 * 1024
    cuda.check_shared_memory(2048, True, 2, 8 * 2048, 8)
    with pytest.raises(DbquantError, match=r"G=3100 groups .*need 74400 bytes.*triton backend"):
        cuda.check_shared_memory(3100, True, 2, 8 * 3100, 8)
