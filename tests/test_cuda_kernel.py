"""Parity of the CUDA decode GEMV (``csrc/cuda/dbgemv.cu`` via ``dbquant.backends.cuda``) with
``dbgemm_ref``, on a GPU.

Needs a CUDA device and the ``dbquant._C_cuda`` extension (built by setup.py only under a CUDA
build of torch): this workplace's CI has neither, so there the module is skipped with the reason,
and ``tests/test_gpu_compile.py`` checks that the kernel compiles. ``scripts/gpu_check.sh``
runs this file on a lent GPU.
"""

from __future__ import annotations

import pytest
import torch

from dbquant.backends import cuda as _cuda
from dbquant.backends import registry
from dbquant.errors import DbquantError
from dbquant.model.modules import PackedLinear
from tests.packed_case import assert_bugs_are_caught, check, make_layer, make_x

if not _cuda.load_cuda():
    pytest.skip(f"the cuda backend cannot run here: {_cuda._cuda_error}", allow_module_level=True)

DEV = "cuda"
run = _cuda.dbgemm_cuda

# (N, K, g): K a multiple of g; K not a multiple of g (padded last group); g = 8 (a group per
# byte); g = 24 and 200 (not powers of 2); K odd (no vector width divides a row); odd N.
SHAPES = [(37, 200, 64), (37, 72, 8), (40, 256, 128), (33, 137, 8), (19, 200, 24), (21, 400, 200),
          (576, 1536, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])  # 5 and 9: more rows than one launch takes
@pytest.mark.parametrize("n,k,g", SHAPES)
def test_parity(n, k, g, m, dtype):
    for offset, bias in ((False, False), (True, True), (True, False)):
        layer = make_layer(n, k, g, offset, bias, DEV)  # a float32 bias: the wrapper casts it to x's dtype
        x = make_x(m, k, dtype, DEV)
        check(run(x, *layer, k, g), x, layer, k, g)


@pytest.mark.parametrize("planes", [1, 3, 4])
@pytest.mark.parametrize("n,k,g", [(37, 200, 64), (19, 200, 24), (33, 137, 8)])
def test_any_plane_count(n, k, g, planes):
    for m in (1, 4):
        layer = make_layer(n, k, g, offset=True, bias=True, device=DEV, seed=planes, planes=planes)
        x = make_x(m, k, torch.float32, DEV)
        check(run(x, *layer, k, g), x, layer, k, g)


def test_strided_and_batched_rows():
    """A row stride over K that no vector width divides, a transposed x and leading dims."""
    n, k, g = 37, 200, 64
    layer = make_layer(n, k, g, offset=True, bias=False, device=DEV)
    wide = make_x(3, k + 3, torch.float16, DEV)[:, :k]
    assert wide.stride(0) == k + 3
    check(run(wide, *layer, k, g), wide, layer, k, g)
    xt = make_x(k, 4, torch.float32, DEV).T
    check(run(xt, *layer, k, g), xt, layer, k, g)
    x3 = make_x(6, k, torch.float32, DEV).reshape(2, 3, k)
    y3 = run(x3, *layer, k, g)
    assert y3.shape == (2, 3, n)
    check(y3.reshape(6, n), x3.reshape(6, k), layer, k, g)


def test_padding_bits_are_ignored():
    n, k, g = 37, 200, 64
    clean = make_layer(n, k, g, offset=True, bias=False, device=DEV, seed=3)
    dirty = make_layer(n, k, g, offset=True, bias=False, device=DEV, seed=3, pad_garbage=True)
    assert not torch.equal(clean[0], dirty[0])
    for m in (1, 4):
        x = make_x(m, k, torch.float32, DEV)
        check(run(x, *dirty, k, g), x, clean, k, g)


def test_every_output_is_written():
    """The output buffer is fresh each call, so poison cannot leak; across repeated calls on the
    same inputs the result is identical (no race between warps)."""
    n, k, g = 1536, 576, 64
    layer = make_layer(n, k, g, offset=True, bias=True, device=DEV)
    x = make_x(4, k, torch.float32, DEV)
    torch.cuda.empty_cache()
    first = run(x, *layer, k, g)
    for _ in range(5):
        assert torch.equal(run(x, *layer, k, g), first)
    check(first, x, layer, k, g)


def test_tolerances_catch_bugs():
    """A wrong bit order, group index, plane order or a dropped offset is far above the tolerance."""
    n, k, g = 37, 200, 64
    layer = make_layer(n, k, g, offset=True, bias=False, device=DEV)
    x = make_x(3, k, torch.float16, DEV)
    assert_bugs_are_caught(run(x, *layer, k, g), x, layer, k, g)


def test_registry_and_packed_linear():
    assert registry.get("dbgemm", "cuda", DEV) is run
    assert registry.resolve("auto", DEV, rows=1) == "cuda"
    assert registry.resolve("auto", DEV, rows=_cuda.CUDA_MAX_ROWS + 1) != "cuda"
    n, k, g = 24, 80, 16
    qweight, scales, off, b = make_layer(n, k, g, offset=True, bias=True, device=DEV)
    mod = PackedLinear(k, n, g, bias=True, offset=True, backend="cuda").to(DEV)
    for name, t in (("qweight", qweight), ("scales", scales), ("offset", off)):
        getattr(mod, name).copy_(t)
    mod.bias.data.copy_(b)
    x = make_x(3, k, torch.float32, DEV)
    check(mod(x), x, (qweight, scales, off, b), k, g)


def test_empty_input():
    n, k, g = 37, 72, 8
    layer = make_layer(n, k, g, offset=False, bias=False, device=DEV)
    assert run(torch.empty(0, k, device=DEV), *layer, k, g).shape == (0, n)


def test_bad_input_is_refused():
    n, k, g = 37, 200, 64
    qweight, scales, off, b = make_layer(n, k, g, offset=True, bias=True, device=DEV)
    x = make_x(2, k, torch.float32, DEV)
    with pytest.raises(DbquantError, match="x must be float16, bfloat16, float32, got torch.int32"):
        run(x.int(), qweight, scales, off, b, k, g)
    with pytest.raises(DbquantError, match=r"200"):
        run(x[:, :199], qweight, scales, off, b, k, g)
    with pytest.raises((DbquantError, RuntimeError), match="CUDA tensor|device"):
        run(x.cpu(), qweight, scales, off, b, k, g)
    with pytest.raises((DbquantError, RuntimeError), match="qweight"):
        run(x, qweight[..., :20], scales, off, b, k, g)
    # More groups than the block can stage in 48 KiB of shared memory: a clear error, no launch.
    kk, gg = 8 * 3100, 8
    big = make_layer(4, kk, gg, offset=True, bias=False, device=DEV)
    with pytest.raises(DbquantError, match="need 74400 bytes of shared memory.*triton backend"):
        run(make_x(1, kk, torch.float32, DEV), *big, kk, gg)
    # The largest G that fits still runs (2048 groups with an offset: exactly 48 KiB).
    kk = 8 * 2048
    edge = make_layer(4, kk, gg, offset=True, bias=False, device=DEV)
    x = make_x(1, kk, torch.float32, DEV)
    check(run(x, *edge, kk, gg), x, edge, kk, gg)
