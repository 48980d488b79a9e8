"""The t16 layout's second byte order, dword rows (csrc/cpu/dbgemm_t16.h, ``cols`` 4).

The same bytes as the unit order, regrouped so that a row's 4 byte columns of one plane sit side by side
(what the AVX-512 VBMI + VNNI integer-table kernel reads, dbgemm_i8lut_avx512_impl.h, "Dword rows").
Checked: the repack's index map on a golden vector and its exact round trip; every kernel path, table
kind and prefill GEMM gives bit for bit the same result from either order (the dword kernel computes
the same integers and then the same float operations as the unit-order kernels); the loaders' choice
of order; the ops' refusals; the fused weights' widening; a whole native decode step.
The kernels' agreement with ``ref`` within their error bounds is checked in test_cpu_kernel.py and
test_cpu_i8lut.py, on the order the loaders choose on the CPU at hand (dword rows where it has VBMI +
VNNI and the groups are a multiple of 32 channels).
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from dbquant.backends import cpu as cpu_backend
from dbquant.backends import t16
from dbquant.backends.checks import KernelInputError
from tests.test_cpu_i8lut import PATHS, run_path
from tests.test_cpu_kernel import make_layer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    HAVE_NATIVE = cpu_backend.load_cpu()

pytestmark = pytest.mark.skipif(not HAVE_NATIVE, reason="dbquant._C (C++ CPU kernel) is not built")


def both_orders(n, k, g, offset, bias, seed, planes):
    """(unit-order weight, dword-row weight, bias, canonical tensors) of one random layer."""
    qweight, scales, off, b = make_layer(n, k, g, offset, bias, seed, False, planes)
    scales = scales.half()
    off = None if off is None else off.half()
    w1, w4 = (t16.prepare_cpu(qweight, scales, off, k, g, cols=c) for c in (1, 4))
    return w1, w4, b, (qweight, scales, off)


def test_golden_bytes_and_round_trip():
    """planes[t, c // 4, p, r, c % 4] = qweight[p, 16 t + r, c] on a hand-checked case, and back."""
    qweight = torch.arange(2 * 20 * 8, dtype=torch.int32).remainder(251).to(torch.uint8).reshape(2, 20, 8)
    scales = torch.ones(20, 2, 2, dtype=torch.float16)
    w4 = t16.prepare_cpu(qweight, scales, None, 64, 32, cols=4)
    assert w4.cols == 4 and tuple(w4.planes.shape) == (2, 2, 2, 16, 4)
    # tile 0, block 1 (columns 4..7), plane 1, row 3: qweight[1, 3, 4..7] = 160 + 3 * 8 + 4.. (mod 251)
    assert w4.planes[0, 1, 1, 3].tolist() == [188, 189, 190, 191]
    for t, c, p, r in itertools.product(range(2), range(8), range(2), range(16)):
        want = int(qweight[p, 16 * t + r, c]) if 16 * t + r < 20 else 0  # rows past N: zero
        assert int(w4.planes[t, c // 4, p, r, c % 4]) == want
    w1 = t16.prepare_cpu(qweight, scales, None, 64, 32, cols=1)
    assert torch.equal(t16.with_cols(w4, 1).planes, w1.planes)
    assert torch.equal(t16.with_cols(w1, 4).planes, w4.planes)
    for a, b in zip(t16.canonical(w4), t16.canonical(w1)):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(t16.canonical(w4)[0], qweight)


@pytest.mark.parametrize("planes", [1, 2, 3, 4])
@pytest.mark.parametrize("k,g", [(32, 32), (100, 32), (576, 64), (1000, 64), (300, 128)])
def test_every_path_reads_both_orders_alike(k, g, planes):
    """Odd N and K, every plane count and M in 1, 3, 17: each ISA path (both AVX-512 lookups) with float,
    int8 and int16 tables gives the same floats from either order, and so do the dequantization and the
    three prefill GEMMs."""
    for n, offset, bias in [(1, False, False), (7, True, False), (33, True, True)]:
        w1, w4, b, _ = both_orders(n, k, g, offset, bias, seed=k + g + n + planes, planes=planes)
        for m in (1, 3, 17):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k))
            for path, kind in itertools.product(PATHS, ("float", "int8", "int16")):
                y1, y4 = run_path(x, w1, b, path, kind), run_path(x, w4, b, path, kind)
                assert torch.equal(y1, y4), f"{path} {kind} m={m} n={n}: {(y1 - y4).abs().max().item()}"
        assert torch.equal(cpu_backend.dequantize_cpu(w1), cpu_backend.dequantize_cpu(w4))
        x = torch.randn(40, k, generator=torch.Generator().manual_seed(k))
        for gemm in ("fp32", "bf16", "int8"):
            assert torch.equal(cpu_backend.dense_gemm(x, w1, b, gemm), cpu_backend.dense_gemm(x, w4, b, gemm)), gemm


def test_loaders_choose_dword_rows_where_the_kernel_runs(monkeypatch):
    """Dword rows where this CPU runs their kernel and the groups hold whole 4-byte blocks; the unit
    order elsewhere; DBQUANT_CPU_COLS forces one where the groups allow it and refuses other values."""
    monkeypatch.delenv("DBQUANT_CPU_COLS", raising=False)
    here = 4 if torch.ops.dbquant.cpu_dword_rows() else 1
    assert [cpu_backend.plane_cols(g) for g in (32, 64, 128)] == [here] * 3
    assert [cpu_backend.plane_cols(g) for g in (8, 24, 48)] == [1, 1, 1]
    qweight, scales, _, _ = make_layer(16, 64, 64, False, False, 0, False, 2)
    assert cpu_backend.prepare_cpu(qweight, scales.half(), None, 64, 64).cols == here
    for forced in ("1", "4"):
        monkeypatch.setenv("DBQUANT_CPU_COLS", forced)
        assert cpu_backend.plane_cols(64) == int(forced) and cpu_backend.plane_cols(48) == 1
    monkeypatch.setenv("DBQUANT_CPU_COLS", "2")
    with pytest.raises(KernelInputError, match="DBQUANT_CPU_COLS must be 1 or 4"):
        cpu_backend.plane_cols(64)


def test_bad_orders_are_refused():
    """Dword rows on groups that are not whole 4-byte blocks, another cols, and planes of the wrong
    shape: clear errors from the repack and from the op."""
    qweight, scales, _, _ = make_layer(16, 96, 48, False, False, 0, False, 2)
    with pytest.raises(KernelInputError, match="dword rows .* group_size a multiple of 32, got 48"):
        t16.prepare_cpu(qweight, scales, None, 96, 48, cols=4)
    with pytest.raises(KernelInputError, match=r"cols must be one of \(1, 4\), got 2"):
        t16.prepare_cpu(qweight, scales, None, 96, 48, cols=2)
    w1 = t16.prepare_cpu(qweight, scales, None, 96, 48)
    forged = w1.planes.reshape(1, 3, 2, 16, 4)  # 5-D planes with groups of 48
    whole = r"dword rows need group_size a multiple of 32 \(whole 4-byte blocks per group\), got 48"
    with pytest.raises(RuntimeError, match=whole):
        torch.ops.dbquant.dbgemm_cpu(torch.randn(1, 96), forged, w1.scales, None, None, 16, 96, 48, "auto", "auto")
    w1, w4, _, _ = both_orders(16, 128, 64, False, False, 0, 2)
    with pytest.raises(RuntimeError, match=r"planes must have shape \[1, 4, 2, 16, 4\]"):
        torch.ops.dbquant.dbgemm_cpu(torch.randn(1, 128), w4.planes[:, :3].contiguous(), w4.scales, None, None,
                                     16, 128, 64, "auto", "auto")


def test_widen_keeps_the_order_where_it_can():
    """The fused weights' widening (t16.widen) keeps dword rows while the new groups hold whole blocks
    (32 | g) and falls back to the unit order otherwise; the outputs match the unwidened weight's."""
    w1, w4, _, canon = both_orders(32, 256, 128, False, False, 3, 2)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(3))
    for g, cols in ((32, 4), (64, 4), (16, 1)):
        wide = t16.widen(w4, 3, g, offset=True)
        assert wide.cols == cols and wide.planes_count == 3 and wide.group_size == g
        assert torch.equal(t16.widen(w1, 3, g, offset=True).planes, t16.with_cols(wide, 1).planes)
        y, want = (cpu_backend.run_cpu(x, w, None, lut="float") for w in (wide, w1))
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)


def test_native_step_is_the_same_in_either_order(monkeypatch):
    """The fast decoder's native step (every layer in one C++ call) on a model loaded in dword rows and
    in the unit order: the same logits and caches bit for bit, position after position."""
    from dbquant.runtime.decode import FastDecoder
    from tests.test_decode import IDS, _packed

    model = _packed("llama")  # groups of 32
    runs = {}
    for cols in ("1", "4"):
        monkeypatch.setenv("DBQUANT_CPU_COLS", cols)
        dec = FastDecoder(model, max_len=32)
        assert dec.stack is not None
        projs = [p for L in dec.layers for p in (L.qkv, L.o, L.gate_up, L.down)]
        assert {p.packed.cols for p in projs} == {int(cols)}
        dec._alloc(1)
        dec.forward(IDS[:1, :4], 0)
        logits = [dec.forward(IDS[:1, p:p + 1], p) for p in range(4, IDS.shape[1])]
        runs[cols] = (torch.cat(logits), dec.k_cache.clone(), dec.v_cache.clone())
    for name, a, b in zip(("logits", "k_cache", "v_cache"), runs["1"], runs["4"]):
        assert torch.equal(a, b), f"{name} differ by {(a - b).abs().max().item()}"
