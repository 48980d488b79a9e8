"""Parity of the C++ CPU kernel (torch.ops.dbquant.dbgemm_cpu) with the reference.

Needs the extension ``dbquant._C``: built by ``pip install --no-build-isolation -e .``.
Without it these tests skip, or FAIL when DBQUANT_REQUIRE_NATIVE=1 (CI sets it).
"""

from __future__ import annotations

import itertools
import os
import warnings

import pytest
import torch

from dbquant import _native
from dbquant.reference import dbgemm_ref

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the skip/fail reason below says it instead
    HAVE_NATIVE = _native.load_cpu()


@pytest.fixture(autouse=True)
def _need_native():
    if HAVE_NATIVE:
        return
    reason = (f"dbquant._C (C++ CPU kernel) is not importable ({_native._cpu_error}); build it "
              f"with `{_native.BUILD_HINT}`")
    if os.environ.get("DBQUANT_REQUIRE_NATIVE") == "1":
        pytest.fail(f"DBQUANT_REQUIRE_NATIVE=1 but {reason}")
    pytest.skip(reason)


def pack_planes(bits: torch.Tensor) -> torch.Tensor:
    """{0,1} [2, N, Kp] -> uint8 [2, N, Kp/8], bit j of byte i = channel 8*i + j (LSB first).

    Written out here rather than borrowed from dbquant.formats so the kernel's bit order
    is pinned independently of the library's own packer.
    """
    p, n, kp = bits.shape
    weights = (1 << torch.arange(8, dtype=torch.int32))
    return (bits.reshape(p, n, kp // 8, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def make_layer(n, k, g, offset, bias, seed=0, pad_garbage=False):
    """Random packed linear: (qweight, scales, offset, bias) with canonical shapes."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // g)
    kp = groups * g
    bits = torch.randint(0, 2, (2, n, kp), generator=gen)
    if not pad_garbage:
        bits[..., k:] = 0  # the format: padded channels hold 0
    qweight = pack_planes(bits)
    scales = torch.randn(n, groups, 2, generator=gen)
    off = torch.randn(n, groups, generator=gen) if offset else None
    b = torch.randn(n, generator=gen) if bias else None
    return qweight, scales, off, b


def assert_matches(y, ref):
    scale = ref.abs().max().clamp_min(1.0).item()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("m", [1, 2, 5, 16, 64])
@pytest.mark.parametrize("g", [8, 32, 64, 128])
@pytest.mark.parametrize("k", [8, 24, 100, 576, 1000])
def test_parity_shapes(k, g, m):
    for n, offset, bias in itertools.product([1, 7, 33], [False, True], [False, True]):
        qweight, scales, off, b = make_layer(n, k, g, offset, bias, seed=k * 7 + g + n)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k))
        y = torch.ops.dbquant.dbgemm_cpu(x, qweight, scales, off, b, k, g)
        assert y.shape == (m, n) and y.dtype == torch.float32
        assert_matches(y, dbgemm_ref(x, qweight, scales, off, b, k, g))


@pytest.mark.parametrize("lead", [(), (3,), (2, 3), (1, 1, 1)])
def test_wrapper_leading_dims(lead):
    n, k, g = 19, 100, 32
    qweight, scales, off, b = make_layer(n, k, g, True, True)
    x = torch.randn(*lead, k)
    y = _native.dbgemm_cpu(x, qweight, scales.half(), off.half(), b, k, g)
    assert y.shape == (*lead, n)
    assert_matches(y, dbgemm_ref(x, qweight, scales.half(), off.half(), b, k, g))


def test_wrapper_noncontiguous_x_and_float16_inputs():
    n, k, g = 40, 96, 32
    qweight, scales, off, b = make_layer(n, k, g, True, True)
    x = torch.randn(k, 6).t()  # [6, K], non-contiguous
    assert not x.is_contiguous()
    ref = dbgemm_ref(x, qweight, scales.half(), off.half(), b.half(), k, g)
    y = _native.dbgemm_cpu(x, qweight, scales.half(), off.half(), b.half(), k, g)
    assert_matches(y, ref)
    # A non-float32 x is computed in float32 and returned in its dtype (the reference's contract).
    yb = _native.dbgemm_cpu(x.bfloat16(), qweight, scales, off, b, k, g)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb, dbgemm_ref(x.bfloat16(), qweight, scales, off, b, k, g))


def test_wrapper_scale_cache_sees_inplace_updates():
    n, k, g = 8, 64, 64
    qweight, scales, _, _ = make_layer(n, k, g, False, False)
    s16 = scales.half()
    x = torch.randn(2, k)
    y1 = _native.dbgemm_cpu(x, qweight, s16, None, None, k, g)
    s16.mul_(2)  # bumps the version counter: the cached float32 copy must not be reused
    y2 = _native.dbgemm_cpu(x, qweight, s16, None, None, k, g)
    assert_matches(y2, 2 * y1)


def test_padding_bits_are_ignored():
    # Channels >= K count as zero activations, so stray bits in the padding change nothing.
    n, k, g = 9, 100, 64
    clean = make_layer(n, k, g, True, False, seed=3)
    dirty = make_layer(n, k, g, True, False, seed=3, pad_garbage=True)
    assert not torch.equal(clean[0], dirty[0])
    x = torch.randn(4, k)
    torch.testing.assert_close(torch.ops.dbquant.dbgemm_cpu(x, *dirty, k, g),
                               torch.ops.dbquant.dbgemm_cpu(x, *clean, k, g), rtol=0, atol=0)


def test_many_rows_uses_several_table_tiles():
    # K=1000 needs 125 KiB of tables per row: M=300 exceeds the 16 MiB cap, so rows are tiled.
    n, k, g = 17, 1000, 128
    qweight, scales, off, b = make_layer(n, k, g, True, True)
    x = torch.randn(300, k)
    assert_matches(torch.ops.dbquant.dbgemm_cpu(x, qweight, scales, off, b, k, g),
                   dbgemm_ref(x, qweight, scales, off, b, k, g))


def test_empty_batch():
    qweight, scales, _, _ = make_layer(5, 24, 8, False, False)
    y = _native.dbgemm_cpu(torch.randn(0, 24), qweight, scales, None, None, 24, 8)
    assert y.shape == (0, 5)


def test_thread_count_does_not_change_result():
    n, k, g = 1536, 576, 64
    qweight, scales, off, b = make_layer(n, k, g, True, True)
    x = torch.randn(3, k)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = torch.ops.dbquant.dbgemm_cpu(x, qweight, scales, off, b, k, g)
        torch.set_num_threads(max(2, old))
        y2 = torch.ops.dbquant.dbgemm_cpu(x, qweight, scales, off, b, k, g)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1, y2)  # each output is computed by one thread, in one order
    assert_matches(y1, dbgemm_ref(x, qweight, scales, off, b, k, g))


# ---- the binding's input validation -------------------------------------------------

K, G_SIZE, N = 300, 64, 6  # G = 5 groups, Kp = 320, 40 bytes per row


@pytest.fixture
def args():
    qweight, scales, off, b = make_layer(N, K, G_SIZE, True, True)
    return dict(x=torch.randn(2, K), qweight=qweight, scales=scales, offset=off, bias=b)


def call(a, in_features=K, group_size=G_SIZE):
    return torch.ops.dbquant.dbgemm_cpu(a["x"], a["qweight"], a["scales"], a["offset"], a["bias"],
                                        in_features, group_size)


@pytest.mark.parametrize("name,bad,match", [
    ("x", lambda a: a["x"].double(), r"x must be Float, got Double"),
    ("x", lambda a: a["x"].half(), r"x must be Float, got Half"),
    ("qweight", lambda a: a["qweight"].to(torch.int8), r"qweight must be Byte, got Char"),
    ("scales", lambda a: a["scales"].half(), r"scales must be Float, got Half"),
    ("offset", lambda a: a["offset"].double(), r"offset must be Float, got Double"),
    ("bias", lambda a: a["bias"].half(), r"bias must be Float, got Half"),
])
def test_error_dtype(args, name, bad, match):
    args[name] = bad(args)
    with pytest.raises(RuntimeError, match=match):
        call(args)


@pytest.mark.parametrize("name,bad,match", [
    ("qweight", lambda a: a["qweight"][:, :, :36].contiguous(),
     r"qweight has 36 bytes per row but in_features=300, group_size=64 needs 40"),
    ("qweight", lambda a: a["qweight"][0].contiguous(), r"qweight must be \[2, N, Kp/8\], got shape \[6, 40\]"),
    ("x", lambda a: a["x"][:, :299].contiguous(), r"x has 299 channels .* but in_features=300"),
    ("x", lambda a: a["x"].reshape(1, 2, K), r"x must be 2-D \[M, K\], got shape \[1, 2, 300\]"),
    ("scales", lambda a: a["scales"][:, :4].contiguous(),
     r"scales must be \[N, G, 2\] = \[6, 5, 2\] .* got shape \[6, 4, 2\]"),
    ("offset", lambda a: a["offset"][:5].contiguous(), r"offset must be \[N, G\] = \[6, 5\], got shape \[5, 5\]"),
    ("bias", lambda a: a["bias"][:3].contiguous(), r"bias must be \[N\] = \[6\], got shape \[3\]"),
])
def test_error_shape(args, name, bad, match):
    args[name] = bad(args)
    with pytest.raises(RuntimeError, match=match):
        call(args)


def test_error_group_size_and_in_features(args):
    with pytest.raises(RuntimeError, match=r"group_size must be a positive multiple of 8, got 12"):
        call(args, group_size=12)
    with pytest.raises(RuntimeError, match=r"in_features must be >= 1, got 0"):
        call(args, in_features=0)


@pytest.mark.parametrize("name,bad", [
    ("x", lambda a: torch.randn(K, 2).t()),
    ("qweight", lambda a: a["qweight"].transpose(0, 1).contiguous().transpose(0, 1)),
    ("scales", lambda a: a["scales"].transpose(0, 1).contiguous().transpose(0, 1)),
    ("offset", lambda a: a["offset"].t().contiguous().t()),
])
def test_error_noncontiguous(args, name, bad):
    args[name] = bad(args)
    assert not args[name].is_contiguous()
    with pytest.raises(RuntimeError, match=rf"{name} must be contiguous"):
        call(args)
