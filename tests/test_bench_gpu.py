"""Smoke test of the GPU benchmark (``dbquant.bench.gpu``): it runs end to end at a tiny
shape on the CPU through the Triton interpreter, and its rows are well formed. Speed is
not checked: without a GPU there is none to check."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from dbquant.backends import triton as _triton  # noqa: E402
from dbquant.bench import gpu as bench_gpu  # noqa: E402
from dbquant.errors import DbquantError  # noqa: E402


@pytest.mark.skipif(not _triton.load_triton(), reason="the triton backend cannot run here")
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
        assert math.isclose(r["tflops"], 2 * r["m"] * r["n"] * r["k"] / (r["ms"] * 1e-3) / 1e12, rel_tol=1e-9)
        assert math.isclose(r["speedup_vs_dense"], r["dense_ms"] / r["ms"], rel_tol=1e-9)
        assert r["measured"] is torch.cuda.is_available()
    table = bench_gpu.format_table(rows)
    unmeasured = not all(r["measured"] for r in rows)  # adds the warning line
    assert len(table.splitlines()) == 2 + len(rows) + 1 + unmeasured
    if not torch.cuda.is_available():
        assert rows[0]["device"] == "cpu (triton interpreter)"
        assert "NOT MEASURED ON A GPU" in table


def test_default_shapes_are_the_issue_s():
    assert bench_gpu.DEFAULT_SHAPES == [(576, 576), (192, 576), (1536, 576), (576, 1536),
                                        (4096, 4096), (11008, 4096), (4096, 11008)]
    assert bench_gpu.DEFAULT_MS == [1, 2, 4, 8, 16, 32, 64, 128, 256]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cuda_backend_refused_without_gpu():
    with pytest.raises(DbquantError, match="backend 'cuda' is not available.*no CUDA device"):
        bench_gpu.run_gpu_bench("cuda", smoke=True)


def test_unknown_dtype():
    with pytest.raises(ValueError, match="dtype must be one of .* got 'int8'"):
        bench_gpu.run_gpu_bench("triton", dtype="int8", smoke=True)
