"""Smoke test of the GPU benchmark (``dbquant.bench.gpu``): it runs end to end at a tiny
shape on the CPU through the Triton interpreter, and its rows are well formed. Speed is
not checked: without a GPU there is none to check."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from dbquant.backends import triton as _triton
from dbquant.bench import gpu as bench_gpu
from dbquant.errors import DbquantError
from tests.tolerances import FLOAT64_RECOMPUTE

needs_triton = pytest.mark.skipif(not _triton.load_triton(), reason="the triton backend cannot run here")


@needs_triton
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_smoke_rows(dtype):
    rows = bench_gpu.run_gpu_bench("triton", dtype=dtype, group_size=64, warmup=1, iters=1, smoke=True)
    assert [(r["n"], r["k"], r["m"]) for r in rows] == [
        (n, k, m) for n, k in bench_gpu.SMOKE_SHAPES for m in bench_gpu.SMOKE_MS]
    for r in rows:
        assert set(r) == set(bench_gpu.ROW_KEYS)
        assert (r["op"], r["backend"], r["dtype"], r["group_size"]) == ("dbgemm", "triton", dtype, 64)
        for key in ("ms", "tflops", "gbps", "dense_ms", "dense_tflops", "speedup_vs_dense"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        assert math.isclose(r["tflops"], 2 * r["m"] * r["n"] * r["k"] / (r["ms"] * 1e-3) / 1e12,
                            rel_tol=FLOAT64_RECOMPUTE)
        assert math.isclose(r["speedup_vs_dense"], r["dense_ms"] / r["ms"], rel_tol=FLOAT64_RECOMPUTE)
        assert r["measured"] is torch.cuda.is_available()
        # The copy ceiling and the CUDA-graph columns exist only on a GPU (where the capture may
        # fail and leave the graph columns empty, with a warning).
        for key in ("copy_gbps", "frac_of_copy", "graph_ms", "dense_graph_ms", "graph_gbps", "graph_speedup_vs_dense"):
            assert r[key] is None if not r["measured"] else (r[key] is None or r[key] > 0), (key, r[key])
        if r["measured"] and r["graph_ms"] is not None:
            assert math.isclose(r["graph_gbps"], io_bytes(r["n"], r["k"], r["m"], 64, torch.finfo(
                getattr(torch, dtype)).bits // 8) / (r["graph_ms"] * 1e-3) / 1e9, rel_tol=FLOAT64_RECOMPUTE)
    table = bench_gpu.format_table(rows)
    unmeasured = not all(r["measured"] for r in rows)  # adds the warning line
    assert len(table.splitlines()) == 2 + len(rows) + 1 + unmeasured
    if not torch.cuda.is_available():
        assert rows[0]["device"] == "cpu (triton interpreter)"
        assert "NOT MEASURED ON A GPU" in table


def io_bytes(n, k, m, g, itemsize):
    """Bytes one call must move: both bit planes of the K-padded weight, two fp16 scales per
    group, the activations x [M, K] and the output y [M, N]."""
    groups = math.ceil(k / g)
    return 2 * n * groups * g // 8 + n * groups * 2 * 2 + (m * k + m * n) * itemsize


@needs_triton
def test_requested_shapes_and_ms_are_timed_in_order():
    """Outside smoke mode, given shapes and Ms are what runs (one row each, shape-major), and
    GB/s counts the packed bytes, not the dense ones."""
    shapes, ms = [(40, 72), (24, 200)], [2, 5]
    rows = bench_gpu.run_gpu_bench("triton", shapes=shapes, ms=ms, group_size=32, dtype="float32",
                                   warmup=1, iters=1)
    assert [(r["n"], r["k"], r["m"]) for r in rows] == [(n, k, m) for n, k in shapes for m in ms]
    for r in rows:
        assert (r["group_size"], r["dtype"]) == (32, "float32")
        assert math.isfinite(r["ms"]) and r["ms"] > 0 and math.isfinite(r["dense_ms"]) and r["dense_ms"] > 0
        expect = io_bytes(r["n"], r["k"], r["m"], 32, 4) / (r["ms"] * 1e-3) / 1e9
        assert math.isclose(r["gbps"], expect, rel_tol=FLOAT64_RECOMPUTE), (r, expect)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cuda_backend_refused_without_gpu():
    with pytest.raises(DbquantError, match="backend 'cuda' is not available.*no CUDA device"):
        bench_gpu.run_gpu_bench("cuda", smoke=True)


def test_unknown_dtype():
    with pytest.raises(ValueError, match="dtype must be one of .* got 'int8'"):
        bench_gpu.run_gpu_bench("triton", dtype="int8", smoke=True)
