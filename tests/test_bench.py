"""`dbquant bench` (kernel rows, JSON, plot) and `dbquant generate --engine` through the CLI."""

import json

import pytest

from dbquant.cli import main
from tests.test_cli import run


def test_kernel_bench_json_and_plot(tmp_path, capsys):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    code, out, _ = run(capsys, "bench", "--shapes", "40x72,16x200", "--m", "1,3", "--threads", "1",
                       "--mode", "cache,stream", "--stream-mib", 1, "--json", js, "--plot", png)
    assert code == 0
    data = json.loads(js.read_text())
    rows = data["rows"]
    assert data["environment"]["isas"][-1] == "scalar"
    # ref is skipped in stream mode: 2 shapes x 2 M x (11 cache + 10 stream backends)
    assert len(rows) == 2 * 2 * 21
    for r in rows:
        assert {"op", "n", "k", "m", "mode", "threads", "backend", "ms", "gbps", "bandwidth_gbps"} <= set(r)
        assert r["ms"] > 0 and r["gbps"] > 0 and r["bandwidth_gbps"] > 0
        assert r["speedup_vs_fp32"] > 0
    stream = [r for r in rows if r["mode"] == "stream"]
    # rotated copies spanning the whole set (1 MiB here; by default 4x the L3, so every call reads DRAM)
    assert all(r["copies"] > 1 and r["rotating_bytes"] >= 1 << 20 for r in stream)
    # float and int tables, and the prefill path's GEMMs (dequantized fp32 / bf16, 8-bit activations with the
    # exact planes or 8-bit weight levels), side by side
    # and the int16 tables on the planes' unit byte order beside the order this CPU's loaders choose
    assert {r["backend"] for r in rows} == {"fp32", "bf16", "ref", "cpu", "cpu-i8lut", "cpu-i16lut", "cpu-i16lut-unit",
                                            "cpu-gemm", "cpu-gemm-bf16", "cpu-gemm-a8", "cpu-gemm-w8a8"}
    cpu = [r for r in rows if r["backend"].startswith("cpu")]
    assert cpu and all(r["weight_bytes"] < r["n"] * r["k"] for r in cpu)  # < 8 bits per weight read
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "40x72" in out.replace(" ", "")


@pytest.mark.parametrize("argv,message", [
    (["--shapes", "4096by4096"], "is not NxK"),
    (["--m", "0"], "--m values must be >= 1"),
    (["--threads", "two"], "--threads takes a comma list of integers"),
    (["--mode", "warm"], "--mode: unknown value"),
    (["--backends", "fp32,int4"], "--backends: unknown value"),
    (["--stream-mib", "0"], "--stream-mib must be >= 1"),
])
def test_bench_bad_options(capsys, argv, message):
    code, _, err = run(capsys, "bench", *argv)
    assert code == 2 and message in err


def test_generate_engines(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "-o", str(out), "--group-size", "32", "--calib", "none"]) == 0
    capsys.readouterr()
    texts = {}
    for engine in ("dbquant", "hf"):
        code, stdout, err = run(capsys, "generate", out, "--prompt", "The quick", "--max-new-tokens", 6,
                                "--raw", "--engine", engine)
        assert code == 0 and f"engine {engine}" in err
        texts[engine] = stdout
    assert texts["dbquant"] == texts["hf"]  # same greedy tokens
    code, _, err = run(capsys, "generate", out, "--prompt", "x", "--raw", "--engine", "dbquant",
                       "--max-new-tokens", 0)
    assert code == 2 and "--max-new-tokens must be >= 1" in err


def test_gpu_bench_smoke_through_the_cli(tmp_path, capsys):
    # Under TRITON_INTERPRET=1 (conftest) the triton backend runs on the CPU at a tiny shape.
    js = tmp_path / "g.json"
    code, out, _ = run(capsys, "bench", "--backend", "triton", "--smoke", "--json", js)
    assert code == 0 and "NOT MEASURED ON A GPU" in out
    rows = json.loads(js.read_text())["rows"]
    assert rows and all(r["backend"] == "triton" and r["measured"] is False and r["ms"] > 0 for r in rows)
